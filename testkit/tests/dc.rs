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
    let out = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
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
        assert_eq!(dc.leader_seen_by(host).await.as_deref(), Some(leader.as_str()), "{host}");
        let members = dc.members(host).await.expect("members");
        let servers: Vec<_> = members.iter().filter(|m| m.server && m.status == 1).collect();
        assert_eq!(servers.len(), 3, "{host} sees three live servers: {members:?}");
        assert_eq!(members.len(), 7, "{host} sees every agent: {members:?}");
        let peers = dc.get_json(host, "/v1/status/peers").await.expect("peers");
        assert_eq!(peers.as_array().map(Vec::len), Some(3), "{host}: {peers}");
        assert_eq!(dc.serf_health(host, host).await.as_deref(), Some("passing"), "{host}");
    }
    // Agents listen on their host's address too, reachable from the client.
    assert!(reaches(&dc, "client", dc.agent_addr_of("lb1")).await);

    let prefix = dc.host("client").netns().trim_end_matches("client").to_owned();
    let pids: Vec<u32> = agents.iter().chain(SERVERS.iter()).filter_map(|h| dc.agent_pid(h)).collect();
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
