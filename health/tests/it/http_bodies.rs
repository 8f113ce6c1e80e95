//! HTTP probes read no more of a body than they keep.

use std::time::{Duration, Instant};

use halo_health::probe::MAX_OUTPUT;
use halo_health::{Outcome, Prober};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::http;

/// How a test server's answer went: bytes of body written, and whether
/// the client took all of it.
#[derive(Debug)]
struct Sent {
    body_bytes: u64,
    complete: bool,
}

/// Serves one connection: `head`, then `body_len` bytes of body (or for
/// ever if `None`, as HTTP/1.1 chunks), stopping when the client goes away.
async fn one_answer(head: String, body_len: Option<u64>) -> (std::net::SocketAddr, oneshot::Receiver<Sent>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 2048];
        // The probe's request; its content does not matter here.
        let _request = s.read(&mut buf).await;
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = Sent {
            body_bytes: 0,
            complete: false,
        };
        if s.write_all(head.as_bytes()).await.is_err() {
            let _unheard = tx.send(sent);
            return;
        }
        loop {
            let written = match body_len {
                Some(total) if sent.body_bytes >= total => {
                    sent.complete = true;
                    break;
                }
                Some(total) => {
                    let n = (total - sent.body_bytes).min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..n]).await.map(|()| n)
                }
                None => {
                    let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                    framed.extend_from_slice(&chunk);
                    framed.extend_from_slice(b"\r\n");
                    s.write_all(&framed).await.map(|()| chunk.len())
                }
            };
            match written {
                Ok(n) => sent.body_bytes += n as u64,
                // The probe closed the connection.
                Err(_) => break,
            }
        }
        let _unheard = tx.send(sent);
    });
    (addr, rx)
}

#[tokio::test]
async fn an_endless_body_is_cut_off_at_the_cap() {
    let (addr, sent) = one_answer("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".into(), None).await;
    let start = Instant::now();
    let r = Prober::default().run(&http(addr, None), Duration::from_secs(30)).await;
    let took = start.elapsed();
    assert_eq!(r.outcome, Outcome::Pass, "{}", &r.output[..100.min(r.output.len())]);
    assert!(r.output.len() <= MAX_OUTPUT, "{} bytes", r.output.len());
    assert!(took < Duration::from_secs(5), "the probe stopped reading: {took:?}");
    let sent = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("the server saw the probe go away")
        .unwrap();
    println!(
        "endless body: probe took {took:?}, server wrote {} bytes",
        sent.body_bytes
    );
}

#[tokio::test]
async fn a_huge_error_body_is_not_read_past_the_cap() {
    let len: u64 = 20 << 20;
    let (addr, sent) = one_answer(
        format!("HTTP/1.1 500 Internal Server Error\r\ncontent-length: {len}\r\n\r\n"),
        Some(len),
    )
    .await;
    let r = Prober::default().run(&http(addr, None), Duration::from_secs(20)).await;
    let sent = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("the server saw the probe go away")
        .unwrap();
    println!("20 MiB body: server wrote {} bytes", sent.body_bytes);
    // Kernel buffers take a few MiB; the probe must not have read the rest.
    assert!(!sent.complete, "the probe read all {} bytes", sent.body_bytes);
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.output.contains("500"), "{}", &r.output[..100.min(r.output.len())]);
    assert!(r.output.len() <= MAX_OUTPUT, "{} bytes", r.output.len());
}

#[tokio::test]
async fn a_transport_error_names_its_cause() {
    // The error's whole source chain, cut to MAX_ERROR_TEXT (a unit test in
    // probe.rs checks the cut).
    let closed = halo_testkit::free_port(std::net::Ipv4Addr::LOCALHOST);
    let r = Prober::default()
        .run(&http(([127, 0, 0, 1], closed).into(), None), Duration::from_secs(5))
        .await;
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(
        r.output.contains("refused"),
        "the cause is named, not just 'client error (Connect)': {}",
        r.output
    );
}
