//! Probes against real sockets and real processes, and the admin server
//! loop against real clients.

mod exec_groups;
mod http_bodies;
mod server_limits;
mod telemetry;

use std::time::{Duration, Instant};

use halo_health::{ExecProbe, HttpProbe, Outcome, Probe, Prober};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP server answering every request with `status` and `body`, or never
/// answering if `hang`.
async fn http_server(status: u16, body: &'static str, hang: bool) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            if hang {
                held.push(s);
                continue;
            }
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _request = s.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _written = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

pub(crate) fn http(addr: std::net::SocketAddr, expect_body: Option<&str>) -> Probe {
    Probe::Http(HttpProbe {
        url: format!("http://{addr}/healthz").parse().unwrap(),
        method: http::Method::GET,
        headers: vec![],
        expect_status: 200..=399,
        expect_body: expect_body.map(str::to_owned),
    })
}

const T: Duration = Duration::from_secs(2);

#[tokio::test]
async fn http_probes_judge_status_and_body_and_time_out() {
    let p = Prober::default();
    let ok = http_server(200, "all good", false).await;
    let r = p.run(&http(ok, Some("good")), T).await;
    assert_eq!(r.outcome, Outcome::Pass, "{}", r.output);
    assert!(r.output.contains("200"), "{}", r.output);

    let r = p.run(&http(ok, Some("missing")), T).await;
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.output.contains("missing"), "{}", r.output);

    let bad = http_server(503, "down", false).await;
    let r = p.run(&http(bad, None), T).await;
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.output.contains("503"), "{}", r.output);

    let hung = http_server(200, "", true).await;
    let start = Instant::now();
    let r = p.run(&http(hung, None), Duration::from_millis(300)).await;
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.output.contains("timed out"), "{}", r.output);
    assert!(start.elapsed() < Duration::from_secs(5));

    let closed = halo_testkit::free_port(std::net::Ipv4Addr::LOCALHOST);
    let r = p.run(&http(([127, 0, 0, 1], closed).into(), None), T).await;
    assert_eq!(r.outcome, Outcome::Fail);
}

#[tokio::test]
async fn tcp_probes_pass_on_connect_and_fail_when_refused() {
    let p = Prober::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    assert_eq!(p.run(&Probe::Tcp(addr), T).await.outcome, Outcome::Pass);
    drop(listener);
    let r = p.run(&Probe::Tcp(addr), T).await;
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.output.contains("refused"), "{}", r.output);
    // A listener whose accept queue is full drops SYNs: the connect hangs
    // and the deadline turns it into a failure.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    full.listen(0).unwrap();
    let full_addr = full.local_addr().unwrap().as_socket().unwrap();
    let start = Instant::now();
    let r = loop {
        let r = p.run(&Probe::Tcp(full_addr), Duration::from_millis(300)).await;
        if r.outcome == Outcome::Fail || start.elapsed() > Duration::from_secs(10) {
            break r;
        }
        // Each probe that got in stays queued (never accepted) and fills
        // the queue a bit more.
    };
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.output.contains("timed out"), "{}", r.output);
}

pub(crate) fn exec(args: &[&str]) -> Probe {
    Probe::Exec(ExecProbe {
        command: args.iter().map(|s| s.to_string()).collect(),
    })
}

#[tokio::test]
async fn exec_probes_map_exit_codes_capture_output_and_time_out() {
    let p = Prober::default();
    let r = p.run(&exec(&["sh", "-c", "echo fine"]), T).await;
    assert_eq!((r.outcome, r.output.as_str()), (Outcome::Pass, "fine"));
    let r = p.run(&exec(&["sh", "-c", "echo slow >&2; exit 1"]), T).await;
    assert_eq!((r.outcome, r.output.as_str()), (Outcome::Warn, "slow"));
    let r = p.run(&exec(&["sh", "-c", "echo broken; exit 2"]), T).await;
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(
        r.output.contains("exit 2") && r.output.contains("broken"),
        "{}",
        r.output
    );

    // No shell: metacharacters are plain arguments.
    let r = p.run(&exec(&["echo", "a;", "exit", "3"]), T).await;
    assert_eq!((r.outcome, r.output.as_str()), (Outcome::Pass, "a; exit 3"));

    // Output is capped.
    let r = p
        .run(&exec(&["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"]), T)
        .await;
    assert_eq!(r.outcome, Outcome::Pass);
    assert!(
        r.output.len() <= halo_health::probe::MAX_OUTPUT,
        "{} bytes",
        r.output.len()
    );

    // A hung command is killed at the deadline.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("survived");
    let script = format!("sleep 2; touch {}", marker.display());
    let start = Instant::now();
    let r = p.run(&exec(&["sh", "-c", &script]), Duration::from_millis(200)).await;
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.output.contains("timed out"), "{}", r.output);
    assert!(start.elapsed() < Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(2500)).await; // the negative check needs the window
    assert!(!marker.exists(), "the timed-out command was killed");

    let r = p.run(&exec(&["/nonexistent/probe"]), T).await;
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(r.output.contains("cannot run"), "{}", r.output);
}
