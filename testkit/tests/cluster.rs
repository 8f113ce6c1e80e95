//! The testkit's own tests: agents and clusters really start, stop and rejoin.

use std::time::Duration;

use halo_testkit::{eventually, ConsulAgent, ConsulCluster};

async fn get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

#[tokio::test]
async fn a_dev_agent_starts_on_free_ports_restarts_and_dies_with_its_handle() {
    let mut a = ConsulAgent::start().await;
    let b = ConsulAgent::start().await;
    assert_ne!(a.http_addr(), b.http_addr(), "parallel agents never share ports");
    assert_ne!(a.http_addr().port(), a.dns_addr().port());
    let leader = get(a.http_addr(), "/v1/status/leader").await.unwrap();
    assert!(leader.contains("127.0.0.1:"), "{leader}");

    a.restart().await;
    assert!(get(a.http_addr(), "/v1/status/leader").await.is_some());

    let addr = b.http_addr();
    let pid = b.pid().unwrap();
    drop(b);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent process is gone after drop"
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_three_server_cluster_survives_losing_its_leader_and_takes_it_back() {
    let mut cluster = ConsulCluster::start(3).await;
    assert_eq!(cluster.len(), 3);
    let ips: std::collections::HashSet<_> = (0..3).map(|i| cluster.http_addr(i).ip()).collect();
    assert_eq!(ips.len(), 3, "each server on its own 127.0.0.x");

    let client = cluster.add_client().await;
    let members = get(client.http_addr(), "/v1/agent/members").await.unwrap();
    for i in 0..3 {
        assert!(members.contains(cluster.node_name(i)), "client sees server {i}");
    }

    let old = cluster.leader().await.expect("a leader");
    cluster.stop(old);
    assert!(!cluster.is_running(old));
    let new = eventually(Duration::from_secs(60), "a new leader", || async {
        cluster.leader().await.filter(|&l| l != old)
    })
    .await;
    assert_ne!(new, old);

    cluster.restart(old).await;
    assert!(cluster.is_running(old));
    // The restarted server follows the same leader as the others.
    let peers = get(cluster.http_addr(old), "/v1/status/peers").await.unwrap();
    assert_eq!(peers.matches("127.0.0.").count(), 3, "{peers}");
}
