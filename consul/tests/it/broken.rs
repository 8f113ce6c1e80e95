//! Answers a real Consul never gives, from a deliberately broken HTTP server
//! (a TCP listener in the test that writes canned bytes): endless bodies,
//! huge error bodies, `null` lists, a TLS port. Fault injection, not a fake
//! Consul: each server answers one way, whatever was asked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_consul::{Client, Config, Error, HealthQuery, QueryOptions};
use halo_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads a request head (up to 64 KiB) so the client is not cut off before
/// it has sent it.
async fn read_head(stream: &mut TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
}

/// A server that answers every connection with `response`, then closes.
async fn canned(response: Vec<u8>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let response = Arc::new(response);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let response = Arc::clone(&response);
            tokio::spawn(async move {
                read_head(&mut stream).await;
                if let Err(e) = stream.write_all(&response).await {
                    // The client may hang up once it has seen enough.
                    eprintln!("canned server: {e}");
                }
            });
        }
    });
    (addr, task)
}

fn client(addr: SocketAddr, max_response_bytes: Option<usize>) -> Client {
    Client::with_env(
        Config {
            address: Some(addr.to_string()),
            timeout: Some(Duration::from_secs(20)),
            max_response_bytes,
            ..Config::default()
        },
        |_| None,
    )
    .unwrap()
}

/// Before the limit, the client collected this body for ever (until its
/// deadline), holding all of it: ~1 GB in 2 s in halo-lb.
#[tokio::test]
async fn an_endless_body_is_cut_at_the_limit() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (sent2, done2) = (Arc::clone(&sent), Arc::clone(&done));
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        read_head(&mut stream).await;
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n[\r\n";
        stream.write_all(head).await.unwrap();
        let chunk = format!("4000\r\n{}\r\n", " ".repeat(0x4000));
        // Streams until the client hangs up; bounded so a broken client
        // cannot keep the test running for ever.
        while sent2.load(Ordering::Relaxed) < 4 << 30 {
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent2.fetch_add(0x4000, Ordering::Relaxed);
        }
        done2.store(true, Ordering::Relaxed);
    });

    let limit = 1 << 20;
    let started = Instant::now();
    let err = client(addr, Some(limit))
        .health_service("web", HealthQuery::passing(), QueryOptions::default())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, Error::TooLarge { limit: 1048576, .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("1048576 bytes") && text.contains("max_response_bytes") && text.contains("health/service/web"),
        "{text}"
    );
    assert!(text.contains(&addr.to_string()), "{text}");
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // The client hung up near the limit: what the server got out is the
    // limit plus what the sockets buffer, not an ever-growing body.
    eventually(
        Duration::from_secs(10),
        "the server to see the client hang up",
        || async { done.load(Ordering::Relaxed).then_some(()) },
    )
    .await;
    let sent = sent.load(Ordering::Relaxed);
    println!("endless body: error after {took:?}, server wrote {sent} bytes for a limit of {limit}");
    assert!(sent < 16 << 20, "server wrote {sent} bytes");
    server.await.unwrap();
}

#[tokio::test]
async fn an_announced_length_over_the_limit_fails_before_reading() {
    let response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n[".to_vec();
    let (addr, server) = canned(response).await;
    let err = client(addr, Some(64 << 10)).session_info("abc").await.unwrap_err();
    assert!(matches!(err, Error::TooLarge { limit: 65536, .. }), "{err:?}");
    assert!(err.to_string().contains("session/info/abc"), "{err}");
    server.abort();
}

/// Before the cut, a 20 MB error body became a 20 MB error message (and
/// so a 20 MB `/status` and hundreds of MB of logs).
#[tokio::test]
async fn a_huge_error_body_makes_a_short_error() {
    let body_len = 20 << 20;
    let mut response =
        format!("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: {body_len}\r\n\r\n")
            .into_bytes();
    response.extend(std::iter::repeat_n(b'x', body_len));
    let (addr, server) = canned(response).await;

    let err = client(addr, None)
        .kv_get("halo/leader", QueryOptions::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Status { .. }), "{err:?}");
    assert!(text.len() < 1024, "{} bytes: {}", text.len(), &text[..200]);
    assert!(text.contains("500") && text.contains("kv/halo/leader"), "{text}");
    assert!(text.contains(&format!("(at least {body_len} bytes)")), "{text}");
    println!("20 MiB error body: {} byte error: {text}", text.len());
    server.abort();
}

#[tokio::test]
async fn null_and_garbage_lists_are_errors_not_empty() {
    for body in ["null", "{}", "[{\"Node\":", "<html>oops</html>"] {
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: 7\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (addr, server) = canned(response.into_bytes()).await;
        let c = client(addr, None);
        let health = c
            .health_service("web", HealthQuery::passing(), QueryOptions::default())
            .await;
        assert!(matches!(health, Err(Error::Decode { .. })), "health {body}: {health:?}");
        let kv = c.kv_get("halo/leader", QueryOptions::default()).await;
        assert!(matches!(kv, Err(Error::Decode { .. })), "kv {body}: {kv:?}");
        let info = c.session_info("abc").await;
        assert!(matches!(info, Err(Error::Decode { .. })), "session {body}: {info:?}");
        let renew = c.session_renew("abc").await;
        assert!(matches!(renew, Err(Error::Decode { .. })), "renew {body}: {renew:?}");
        server.abort();
    }
}

/// What a plain-HTTP client sees when the address is a TLS port.
#[tokio::test]
async fn a_tls_port_is_named_as_the_likely_cause() {
    // A TLS alert record (handshake failure), as a TLS server sends to a
    // client that does not speak TLS.
    let (addr, server) = canned(b"\x15\x03\x01\x00\x02\x02\x28".to_vec()).await;
    let err = client(addr, None)
        .kv_get("k", QueryOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert!(err.to_string().contains("TLS"), "{err}");
    server.abort();
}
