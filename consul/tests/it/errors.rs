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
    // Before: "cannot reach Consul for GET kv/k: client error (Connect)".
    let text = err.to_string();
    assert!(text.contains("kv/k"), "{text}");
    assert!(
        text.contains(&format!("cannot reach Consul at 127.0.0.1:{port}")) && text.contains("connection refused"),
        "{text}"
    );
}

/// A listener whose accept queue is full drops new SYNs: connecting hangs,
/// as to a host behind a firewall that drops packets.
#[tokio::test]
async fn a_connect_that_hangs_says_it_timed_out() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the accept queue (never accepted) until a connect hangs.
    let mut held = Vec::new();
    let mut hung = false;
    for _ in 0..64 {
        match tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => held.push(stream),
            Ok(Err(e)) => panic!("connect to the filling listener failed: {e}"),
            Err(_) => {
                hung = true;
                break;
            }
        }
    }
    assert!(
        hung,
        "{} connects went through; the accept queue never filled",
        held.len()
    );

    let client = Client::new(Config {
        address: Some(addr.to_string()),
        timeout: Some(Duration::from_millis(300)),
        ..Config::default()
    })
    .unwrap();
    // A plain call: the call's deadline and the connect timeout are the
    // same, so either may fire first; both say so.
    let err = client.kv_get("k", QueryOptions::default()).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Timeout { .. } | Error::Transport { .. }),
        "{err:?}"
    );
    assert!(text.contains(&addr.to_string()) && text.contains("timed out"), "{text}");
    assert!(err.is_unavailable());
    // A blocking call has a longer deadline; the connect timeout (the
    // client's timeout) fires first and says so.
    let err = client
        .kv_get("k", QueryOptions::blocking(5, Duration::from_secs(2)))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert!(
        text.contains(&format!("cannot reach Consul at {addr}")) && text.contains("connection timed out"),
        "{text}"
    );
    assert!(err.is_unavailable());
    drop(listener);
    drop(held);
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
    assert!(
        err.to_string()
            .contains(&format!("Consul at {addr} did not answer GET kv/k")),
        "{err}"
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
