//! The datacenter harness: it comes up as production is shaped, every fault
//! primitive has the effect it claims as seen from outside, and it leaves
//! nothing behind. Needs `HALO_NETNS_TESTS=1` and root (see
//! `halo_testkit::netns::required`); datacenters run one at a time (the
//! testkit's process-wide lock).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use halo_testkit::dc::{Datacenter, DcSpec, SERVERS};
use halo_testkit::eventually;

/// Generous: several times what these take on a two-core machine.
const WAIT: Duration = Duration::from_secs(60);

fn namespaces() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Consul's defaults but for `raft_multiplier = 1`: the first election takes
/// about a second instead of several, for tests whose subject is not raft.
fn fast_raft() -> DcSpec {
    DcSpec {
        raft_multiplier: Some(1),
        ..DcSpec::default()
    }
}

/// Whether `from` completes a TCP handshake with `to` within 2 s.
async fn reaches(dc: &Datacenter, from: &str, to: SocketAddr) -> bool {
    dc.host(from).connect(to).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comes_up_with_three_servers_and_a_leader_everywhere_and_leaves_nothing() {
    if !halo_testkit::netns::required("dc::comes_up_with_three_servers_and_a_leader_everywhere_and_leaves_nothing") {
        return;
    }
    let dc = Datacenter::start(DcSpec::default()).await;
    let s = dc.startup();
    eprintln!(
        "FIGURE dc start ({}): network {:?}, leader {:?}, all agents ready {:?}",
        dc.spec().describe(),
        s.network,
        s.leader,
        s.ready
    );
    let leader = dc.leader().await.expect("the servers agree on a leader");
    let agents = ["client", "lb1", "lb2", "backend1"];
    for host in agents.iter().chain(SERVERS.iter()) {
        assert_eq!(dc.host(host).ip().octets()[..2], [198, 18], "{host}");
        assert_eq!(
            dc.leader_seen_by(host).await.as_deref(),
            Some(leader.as_str()),
            "{host}"
        );
        let members = dc.members(host).await.expect("members");
        let servers: Vec<_> = members.iter().filter(|m| m.server && m.status == 1).collect();
        assert_eq!(servers.len(), 3, "{host} sees three live servers: {members:?}");
        assert_eq!(members.len(), 7, "{host} sees every agent: {members:?}");
        let peers = dc.get_json(host, "/v1/status/peers").await.expect("peers");
        assert_eq!(peers.as_array().map(Vec::len), Some(3), "{host}: {peers}");
        assert_eq!(dc.serf_health(host, host).await.as_deref(), Some("passing"), "{host}");
        // Consul's defaults: raft_multiplier 5 and memberlist's LAN gossip.
        assert_timing(&dc, host, "5s", "1s", "500ms", 4).await;
    }
    // Agents listen on their host's address too, reachable from the client.
    assert!(reaches(&dc, "client", dc.agent_addr_of("lb1")).await);

    let prefix = dc.host("client").netns().trim_end_matches("client").to_owned();
    let pids: Vec<u32> = agents
        .iter()
        .chain(SERVERS.iter())
        .filter_map(|h| dc.agent_pid(h))
        .collect();
    assert_eq!(pids.len(), 7);
    let mut cmd = dc.host("backend1").command("sleep");
    cmd.arg("600");
    let sleeper = dc.spawn("backend1", cmd, "sleep");
    let sleeper_pid = sleeper.pid();
    std::mem::forget(sleeper); // left to the datacenter's clean-up
    let dir: PathBuf = dc.agent_log("lb1").parent().unwrap().parent().unwrap().to_path_buf();
    assert!(dir.exists());
    let took = dc.stop();
    eprintln!("FIGURE dc teardown: {took:?}");
    assert!(!namespaces().contains(&prefix), "namespaces left: {}", namespaces());
    for pid in pids.into_iter().chain([sleeper_pid]) {
        // Killed; reaped (the sleeper by nobody: a zombie at most).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z "), "pid {pid} still runs: {stat}");
    }
    assert!(!dir.exists(), "{} removed", dir.display());
}

/// A KV write and read through `host`'s agent: whether the servers answer it.
async fn kv_works(dc: &Datacenter, host: &str) -> bool {
    let path = format!("/v1/kv/halo-dc-test/{host}");
    matches!(dc.consul(host, "PUT", &path, "x").await, Some((200, _)))
        && matches!(dc.consul(host, "GET", &path, "").await, Some((200, _)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_separates_exactly_the_chosen_pairs_until_healed() {
    if !halo_testkit::netns::required("dc::a_cut_separates_exactly_the_chosen_pairs_until_healed") {
        return;
    }
    let dc = Datacenter::start(fast_raft()).await;
    assert!(kv_works(&dc, "lb1").await && kv_works(&dc, "lb2").await);

    // lb1 from the servers only.
    dc.cut_from_servers("lb1");
    let began = Instant::now();
    eventually(WAIT, "lb1's agent to lose the leader", || async {
        dc.leader_seen_by("lb1").await.is_none().then_some(())
    })
    .await;
    eprintln!(
        "FIGURE cut from servers: lb1's agent cannot name a leader (2 s HTTP timeout included) after {:?} ({})",
        began.elapsed(),
        dc.spec().describe()
    );
    assert!(!kv_works(&dc, "lb1").await, "KV through lb1's agent fails");
    assert!(kv_works(&dc, "lb2").await, "KV through lb2's agent works");
    assert!(dc.leader_seen_by("lb2").await.is_some());
    // lb1 still reaches the other hosts, and they reach it.
    assert!(reaches(&dc, "lb1", dc.agent_addr_of("lb2")).await);
    assert!(reaches(&dc, "client", dc.agent_addr_of("lb1")).await);
    assert!(!reaches(&dc, "lb1", dc.agent_addr_of("server1")).await);
    assert!(!reaches(&dc, "server2", dc.agent_addr_of("lb1")).await);
    // Its own agent still answers agent endpoints: the trap docs/consul.md names.
    assert!(matches!(
        dc.consul("lb1", "GET", "/v1/agent/self", "").await,
        Some((200, _))
    ));

    dc.heal_all();
    eventually(WAIT, "lb1's KV to work again", || async {
        kv_works(&dc, "lb1").await.then_some(())
    })
    .await;
    assert!(dc.net().cuts().is_empty());

    // The two balancers from each other only, on every address they own:
    // a listener on lb1's VIP (the kernel completes handshakes for it).
    dc.host("lb1")
        .run("ip", ["addr", "add", &format!("{}/24", dc.vip()), "dev", "eth0"]);
    let vip = SocketAddr::from((dc.vip(), 9000));
    let _listener = dc.host("lb1").within(move || std::net::TcpListener::bind(vip)).unwrap();
    assert!(reaches(&dc, "lb2", vip).await);
    dc.cut("lb1", "lb2");
    assert_eq!(dc.net().cuts(), vec![("lb1".to_owned(), "lb2".to_owned())]);
    assert!(!reaches(&dc, "lb1", dc.agent_addr_of("lb2")).await);
    assert!(!reaches(&dc, "lb2", dc.agent_addr_of("lb1")).await);
    assert!(!reaches(&dc, "lb2", vip).await, "the VIP on lb1 is cut off too");
    assert!(reaches(&dc, "client", vip).await);
    assert!(
        kv_works(&dc, "lb1").await && kv_works(&dc, "lb2").await,
        "both still reach Consul"
    );
    dc.heal("lb2", "lb1");
    assert!(reaches(&dc, "lb2", dc.agent_addr_of("lb1")).await);

    // UDP to one port only, both ways; other ports and TCP pass.
    dc.cut_udp("lb1", "lb2", 9901);
    assert_eq!(dc.net().udp_cuts(), vec![("lb1".to_owned(), "lb2".to_owned(), 9901)]);
    assert!(!udp_arrives(&dc, "lb2", "lb1", 9901));
    assert!(!udp_arrives(&dc, "lb1", "lb2", 9901));
    assert!(udp_arrives(&dc, "lb2", "lb1", 9902));
    assert!(udp_arrives(&dc, "client", "lb1", 9901), "only between the two");
    assert!(reaches(&dc, "lb2", dc.agent_addr_of("lb1")).await);
    dc.heal_udp("lb2", "lb1", 9901);
    assert!(udp_arrives(&dc, "lb2", "lb1", 9901));
    assert!(dc.net().udp_cuts().is_empty());
}

/// Whether a datagram sent from `from` to `to`'s address at `port` arrives
/// within 500 ms.
fn udp_arrives(dc: &Datacenter, from: &str, to: &str, port: u16) -> bool {
    let dest = SocketAddr::from((dc.host(to).ip(), port));
    let socket = dc.host(to).within(move || std::net::UdpSocket::bind(dest)).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    dc.host(from)
        .within(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.send_to(b"ping", dest)
        })
        .unwrap();
    let mut buf = [0u8; 16];
    socket.recv_from(&mut buf).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulled_cable_isolates_a_host_whose_processes_run_on() {
    if !halo_testkit::netns::required("dc::a_pulled_cable_isolates_a_host_whose_processes_run_on") {
        return;
    }
    let dc = Datacenter::start(fast_raft()).await;
    let agent = dc.agent_pid("lb1").unwrap();
    assert!(dc.net().is_plugged("lb1"));
    dc.unplug("lb1");
    assert!(!dc.net().is_plugged("lb1"), "the bridge-side link is down");
    assert!(
        !reaches(&dc, "client", dc.agent_addr_of("lb1")).await,
        "lb1 unreachable"
    );
    assert!(!reaches(&dc, "lb1", dc.agent_addr_of("server1")).await);
    assert!(reaches(&dc, "client", dc.agent_addr_of("lb2")).await);
    // Its processes run on and its own agent still answers locally.
    assert_eq!(dc.agent_pid("lb1"), Some(agent));
    assert!(dc.net().is_powered("lb1"));
    let began = Instant::now();
    eventually(WAIT, "lb1's serfHealth to turn critical", || async {
        (dc.serf_health("lb2", "lb1").await.as_deref() == Some("critical")).then_some(())
    })
    .await;
    eprintln!(
        "FIGURE cable pull: lb1's serfHealth critical (seen from lb2) after {:?} ({})",
        began.elapsed(),
        dc.spec().describe()
    );
    dc.plug("lb1");
    assert!(dc.net().is_plugged("lb1"));
    eventually(WAIT, "the client to reach lb1 again", || async {
        reaches(&dc, "client", dc.agent_addr_of("lb1")).await.then_some(())
    })
    .await;
    eventually(WAIT, "lb1's serfHealth to pass again", || async {
        (dc.serf_health("lb2", "lb1").await.as_deref() == Some("passing")).then_some(())
    })
    .await;
    assert_eq!(dc.agent_pid("lb1"), Some(agent), "the same agent throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_off_kills_everything_in_a_host_and_power_on_restarts_its_agent() {
    if !halo_testkit::netns::required("dc::power_off_kills_everything_in_a_host_and_power_on_restarts_its_agent") {
        return;
    }
    let dc = Datacenter::start(fast_raft()).await;
    let mut cmd = dc.host("lb1").command("sh");
    cmd.args(["-c", "echo started; exec sleep 600"]);
    let mut sleeper = dc.spawn("lb1", cmd, "sleeper");
    eventually(WAIT, "the sleeper's log line", || async {
        sleeper.log_tail(100).contains("started").then_some(())
    })
    .await;
    dc.host("lb1")
        .run("ip", ["addr", "add", &format!("{}/24", dc.vip()), "dev", "eth0"]);
    let node_id = dc.get_json("lb1", "/v1/agent/self").await.unwrap()["Config"]["NodeID"].clone();

    dc.power_off("lb1");
    let began = Instant::now();
    assert!(!sleeper.is_running(), "the host's processes are dead");
    assert_eq!(dc.agent_pid("lb1"), None, "its agent too");
    assert!(!dc.net().is_powered("lb1"), "eth0 is down");
    assert!(!reaches(&dc, "client", dc.agent_addr_of("lb1")).await);
    eventually(WAIT, "lb1's serfHealth critical as lb2's agent sees it", || async {
        (dc.serf_health("lb2", "lb1").await.as_deref() == Some("critical")).then_some(())
    })
    .await;
    eprintln!(
        "FIGURE power-off: lb1's serfHealth critical (seen from lb2) after {:?} ({})",
        began.elapsed(),
        dc.spec().describe()
    );

    dc.power_on("lb1").await;
    assert!(dc.net().is_powered("lb1"));
    assert_eq!(
        dc.host("lb1").addresses(),
        vec![dc.host("lb1").ip()],
        "the VIP went with the power"
    );
    assert!(!sleeper.is_running(), "nothing but the agent is restarted");
    let again = dc.get_json("lb1", "/v1/agent/self").await.unwrap()["Config"]["NodeID"].clone();
    assert_eq!(node_id, again, "same data dir, same node");
    eventually(WAIT, "lb1's serfHealth passing as lb2's agent sees it", || async {
        (dc.serf_health("lb2", "lb1").await.as_deref() == Some("passing")).then_some(())
    })
    .await;
    assert!(kv_works(&dc, "lb1").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_it_rejoins() {
    if !halo_testkit::netns::required("dc::killing_the_leader_elects_another_and_it_rejoins") {
        return;
    }
    let dc = Datacenter::start(DcSpec::default()).await;
    let old = dc.kill_leader().await;
    let began = Instant::now();
    assert_eq!(dc.agent_pid(&old), None);
    let new = eventually(WAIT, "the surviving servers to agree on a new leader", || async {
        dc.leader().await.filter(|l| *l != old)
    })
    .await;
    let servers_agree = began.elapsed();
    eventually(WAIT, "the client's agent to see the new leader", || async {
        (dc.leader_seen_by("client").await.as_ref() == Some(&new)).then_some(())
    })
    .await;
    eprintln!(
        "FIGURE leader kill: new leader {new} (was {old}): servers agree after {servers_agree:?}, \
         the client's agent sees it after {:?} ({})",
        began.elapsed(),
        dc.spec().describe()
    );
    eventually(WAIT, "KV through lb1's agent", || async {
        kv_works(&dc, "lb1").await.then_some(())
    })
    .await;
    dc.start_agent(&old).await;
    assert_eq!(
        dc.leader().await.as_deref(),
        Some(new.as_str()),
        "all three agree again"
    );
    let members = dc.members(&old).await.unwrap();
    assert_eq!(
        members.iter().filter(|m| m.server && m.status == 1).count(),
        3,
        "{members:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_process_completes_handshakes_but_does_not_answer_and_a_killed_one_is_gone() {
    if !halo_testkit::netns::required(
        "dc::a_paused_process_completes_handshakes_but_does_not_answer_and_a_killed_one_is_gone",
    ) {
        return;
    }
    let dc = Datacenter::start(DcSpec {
        balancers: 1,
        ..fast_raft()
    })
    .await;
    // Any process with a listener will do: the backend host's agent.
    let addr = dc.agent_addr_of("backend1");
    let ask = || async {
        let stream = dc.client().connect(addr).await.ok()?;
        halo_testkit::http::request_over(stream, addr, "GET", "/v1/agent/self").await
    };
    assert!(matches!(ask().await, Some((200, _))));
    dc.pause_agent("backend1");
    assert!(reaches(&dc, "client", addr).await, "the kernel completes the handshake");
    assert_eq!(ask().await, None, "nothing answers within 2 s");
    dc.resume_agent("backend1");
    assert!(matches!(ask().await, Some((200, _))));

    let pid = dc.agent_pid("backend1").unwrap();
    dc.kill_agent("backend1");
    assert_eq!(dc.agent_pid("backend1"), None);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "killed and reaped"
    );
    eventually(WAIT, "the connection to the killed agent to be refused", || async {
        dc.client().connect(addr).await.err().map(|e| e.kind())
    })
    .await;
    let mut cmd = dc.host("backend1").command("sleep");
    cmd.arg("600");
    let mut sleeper = dc.spawn("backend1", cmd, "sleep");
    let stat = format!("/proc/{}/stat", sleeper.pid());
    let state = || {
        let stat = std::fs::read_to_string(&stat).unwrap();
        // "pid (comm) S …": the state follows the last ')'.
        let (_, rest) = stat.rsplit_once(')').unwrap();
        rest.split_whitespace().next().unwrap().to_owned()
    };
    sleeper.pause();
    eventually(WAIT, "the paused process to be stopped", || async {
        (state() == "T").then_some(())
    })
    .await;
    sleeper.resume();
    eventually(WAIT, "the resumed process to run", || async {
        (state() != "T").then_some(())
    })
    .await;
    sleeper.kill();
    assert!(!sleeper.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_and_gossip_overrides_reach_every_agent() {
    if !halo_testkit::netns::required("dc::raft_and_gossip_overrides_reach_every_agent") {
        return;
    }
    let gossip = halo_testkit::dc::GossipLan {
        probe_interval: Duration::from_millis(200),
        probe_timeout: Duration::from_millis(100),
        suspicion_mult: 3,
        ..halo_testkit::dc::GossipLan::CONSUL_DEFAULT
    };
    let dc = Datacenter::start(DcSpec {
        raft_multiplier: Some(1),
        gossip_lan: Some(gossip),
        ..DcSpec::default()
    })
    .await;
    let s = dc.startup();
    eprintln!(
        "FIGURE dc start ({}): network {:?}, leader {:?}, all agents ready {:?}",
        dc.spec().describe(),
        s.network,
        s.leader,
        s.ready
    );
    for host in ["server1", "server2", "server3", "client", "lb1", "lb2", "backend1"] {
        assert_timing(&dc, host, "1s", "200ms", "100ms", 3).await;
    }
    // And a leader election at this multiplier, for the figure.
    let old = dc.kill_leader().await;
    let began = Instant::now();
    let new = eventually(WAIT, "a new leader, as the client's agent sees it", || async {
        dc.leader_seen_by("client").await.filter(|l| *l != old)
    })
    .await;
    eprintln!(
        "FIGURE leader kill: new leader {new} (was {old}) seen by the client's agent after {:?} ({})",
        began.elapsed(),
        dc.spec().describe()
    );
}

/// Checks the raft and LAN gossip timing `host`'s agent runs with.
async fn assert_timing(dc: &Datacenter, host: &str, election: &str, probe: &str, probe_timeout: &str, suspicion: u64) {
    let config = dc.get_json(host, "/v1/agent/self").await.unwrap();
    let debug = &config["DebugConfig"];
    assert_eq!(debug["ConsulRaftElectionTimeout"], election, "{host}");
    assert_eq!(debug["GossipLANProbeInterval"], probe, "{host}");
    assert_eq!(debug["GossipLANProbeTimeout"], probe_timeout, "{host}");
    assert_eq!(debug["GossipLANSuspicionMult"], suspicion, "{host}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_test_leaves_nothing_behind() {
    if !halo_testkit::netns::required("dc::a_panicking_test_leaves_nothing_behind") {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let test = tokio::spawn(async move {
        // Fast raft: this test is about the clean-up only.
        let dc = Datacenter::start(fast_raft()).await;
        dc.cut("lb1", "lb2");
        dc.unplug("lb2");
        let mut cmd = dc.host("lb1").command("sleep");
        cmd.arg("600");
        let sleeper = dc.spawn("lb1", cmd, "sleep");
        let prefix = dc.host("client").netns().trim_end_matches("client").to_owned();
        let pids: Vec<u32> = ["server1", "lb1"].iter().filter_map(|h| dc.agent_pid(h)).collect();
        let dir = dc.log_dir().parent().unwrap().to_path_buf();
        tx.send((prefix, pids, sleeper.pid(), dir)).unwrap();
        panic!("a deliberate failure with a datacenter up");
    });
    let err = test.await.expect_err("the task panicked");
    assert!(err.is_panic());
    let (prefix, pids, sleeper, dir) = rx.recv().unwrap();
    assert!(!namespaces().contains(&prefix), "namespaces left: {}", namespaces());
    for pid in pids.into_iter().chain([sleeper]) {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} is gone"
        );
    }
    assert!(!dir.exists(), "{} removed", dir.display());
}
