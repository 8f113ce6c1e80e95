//! How failures to reach Consul surface. These use sockets that misbehave on
//! purpose (a closed port, a listener that never answers): faults between us
//! and Consul, not a fake Consul.

use std::time::{Duration, Instant};

use halo_consul::{Client, Config, Error, QueryOptions};

#[tokio::test]
async fn a_closed_port_is_a_transport_error() {
    let port = halo_testkit::free_port(std::net::Ipv4Addr::LOCALHOST);
    let client = Client::from_address(format!("127.0.0.1:{port}")).unwrap();
    let err = client.kv_get("k", QueryOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert!(err.is_unavailable());
    assert!(err.to_string().contains("kv/k"), "{err}");
}

#[tokio::test]
async fn a_hung_agent_is_a_timeout_and_blocking_calls_get_wait_plus_margin() {
    // Accepts connections and never answers, like a wedged agent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let client = Client::new(Config {
        address: Some(addr.to_string()),
        timeout: Some(Duration::from_millis(300)),
        ..Config::default()
    })
    .unwrap();

    let start = Instant::now();
    let err = client.kv_get("k", QueryOptions::default()).await.unwrap_err();
    assert!(
        matches!(err, Error::Timeout { after, .. } if after == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));

    // A blocking read of wait 1.6 s may take up to wait + wait/16 before
    // Consul answers; the deadline is that plus the client's timeout.
    let err = client
        .kv_get("k", QueryOptions::blocking(5, Duration::from_millis(1600)))
        .await
        .unwrap_err();
    match err {
        Error::Timeout { after, .. } => assert_eq!(after, Duration::from_millis(1600 + 100 + 300)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    holder.abort();
}
