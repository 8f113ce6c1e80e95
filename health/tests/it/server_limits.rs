//! The admin server loop bounds what clients can hold: header deadline,
//! idle timeout, connection lifetime and a cap on connections.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use halo_health::server::{serve_with, text_response, ServerLimits};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// An admin server answering "ok\n" to everything, stopped on drop.
struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn server(limits: ServerLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve_with(listener, stop.clone(), limits, |_req| async {
        text_response(StatusCode::OK, "ok\n")
    }));
    Server { addr, stop }
}

fn limits(header: u64, idle: u64, lifetime: u64, cap: usize) -> ServerLimits {
    ServerLimits {
        header_read_timeout: Duration::from_millis(header),
        idle_timeout: Duration::from_millis(idle),
        max_lifetime: Duration::from_millis(lifetime),
        max_connections: cap,
    }
}

/// Sends one keep-alive request and reads its response; `None` if the
/// server closed the connection instead.
async fn request(stream: &mut TcpStream) -> Option<()> {
    stream.write_all(b"GET /x HTTP/1.1\r\nhost: test\r\n\r\n").await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nok\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        assert!(got.len() < 64 * 1024, "runaway response");
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    Some(())
}

/// Waits (up to `within`) for the server to close `stream`; how long that took.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server kept the connection open for {within:?}"));
    start.elapsed()
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_at_the_header_deadline() {
    let s = server(limits(1000, 30_000, 300_000, 64)).await;
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    let start = Instant::now();
    stream.write_all(b"GET /x HTTP/1.1\r\nx-slow: ").await.unwrap();
    let mut buf = [0u8; 1024];
    let cut_off = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    // hyper may answer 408 before closing.
                    Ok(_) => {}
                },
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    if stream.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    let took = start.elapsed();
    assert!(cut_off.is_ok(), "a byte every 500ms kept the connection for 10s");
    println!("slowloris connection closed after {took:?} (header timeout 1s)");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn beyond_the_cap_clients_wait_until_a_connection_closes() {
    let s = server(limits(30_000, 30_000, 300_000, 3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        request(&mut c).await.expect("served under the cap");
        held.push(c);
    }
    // The kernel completes the handshake (backlog); the server must not
    // accept it.
    let mut extra = TcpStream::connect(s.addr).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(1000), request(&mut extra)).await;
    assert!(waited.is_err(), "a fourth connection was served over a cap of 3");
    drop(held.pop());
    let start = Instant::now();
    // The request written above is waiting in the socket; read its answer.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !got.ends_with(b"\r\n\r\nok\n") {
            let n = extra.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed instead of served");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("served once a slot was free");
    println!("served {:?} after a slot was freed", start.elapsed());
    // And the connection is a normal one from then on.
    request(&mut extra).await.expect("served again");
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let s = server(limits(30_000, 500, 300_000, 64)).await;
    // Kept alive after a request.
    let mut used = TcpStream::connect(s.addr).await.unwrap();
    request(&mut used).await.expect("served");
    // Never sent anything.
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let (a, b) = tokio::join!(
        closed_within(&mut used, Duration::from_secs(10)),
        closed_within(&mut silent, Duration::from_secs(10))
    );
    println!("idle connections closed after {a:?} and {b:?} (idle timeout 500ms)");
    for took in [a, b] {
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}

#[tokio::test]
async fn a_busy_connection_is_retired_after_its_lifetime() {
    let s = server(limits(30_000, 30_000, 1000, 64)).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let start = Instant::now();
    let mut served = 0;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while request(&mut c).await.is_some() {
            served += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let took = start.elapsed();
    assert!(ended.is_ok(), "a busy connection lived past 10s with a 1s lifetime");
    println!("retired after {took:?} and {served} requests (lifetime 1s)");
    assert!(served >= 3, "{served}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}
