//! Active health checks from the balancer, end to end: real HTTP checks of
//! real backends, and the picks that follow them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halo_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// An HTTP/1.1 backend: `GET /healthz` answers 200 while `healthy`, else
/// 503; any other path answers 200 with the backend's name. One request per
/// connection.
struct HttpBackend {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpBackend {
    async fn start(name: &str, healthy: bool) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let flag = Arc::new(AtomicBool::new(healthy));
        let (name, healthy) = (name.to_owned(), Arc::clone(&flag));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (name, healthy) = (name.clone(), Arc::clone(&healthy));
                tokio::spawn(async move { answer(stream, &name, &healthy).await });
            }
        });
        HttpBackend {
            addr,
            healthy: flag,
            task,
        }
    }

    fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: TcpStream, name: &str, healthy: &AtomicBool) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let request = String::from_utf8_lossy(&request);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = if path == "/healthz" {
        if healthy.load(Ordering::SeqCst) {
            ("200 OK", "ok".to_owned())
        } else {
            ("503 Service Unavailable", "sick".to_owned())
        }
    } else {
        ("200 OK", name.to_owned())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _reply_result = stream.write_all(reply.as_bytes()).await;
}

/// Sends one request through the VIP and returns who answered: an HTTP
/// backend's body, or a greeting backend's first line.
async fn who(vip: SocketAddr) -> String {
    let mut stream = TcpStream::connect(vip).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nhost: vip\r\n\r\n").await.unwrap();
    // A greeting backend echoes until EOF; closing our side ends it.
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut reply))
        .await
        .expect("a reply")
        .unwrap();
    match reply.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/") => body.to_owned(),
        _ => reply.lines().next().unwrap_or_default().to_owned(),
    }
}

async fn whos(vip: SocketAddr, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        seen.insert(who(vip).await);
    }
    seen
}

/// The `/status` entry of backend `addr`.
async fn entry(lb: &Lb, addr: SocketAddr) -> serde_json::Value {
    lb.status().await["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn backends_failing_their_http_check_are_skipped_until_they_pass_rise_times() {
    // Accepts TCP but does not speak HTTP: a TCP check would pass it.
    let greeter = TestBackend::start("greeter", Behavior::GreetEcho).await;
    let good = HttpBackend::start("good", true).await;
    let flaky = HttpBackend::start("flaky", false).await;
    let (admin, vip) = addrs();
    let config = one_vip(
        admin,
        vip,
        &[greeter.addr, good.addr, flaky.addr],
        "[vip.check]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 3\nfall = 2\n",
    );
    let lb = Lb::start(&config, admin, &[vip]).await;

    eventually(
        DEADLINE,
        "the greeter and the sick backend to fail their checks",
        || async {
            let (g, f) = (entry(&lb, greeter.addr).await, entry(&lb, flaky.addr).await);
            (g["state"] == "check_failing" && f["state"] == "check_failing").then_some(())
        },
    )
    .await;
    let version = lb.status().await["vips"][0]["table_version"].clone();
    let g = entry(&lb, greeter.addr).await;
    assert_eq!(g["check"]["status"], "critical");
    assert!(!g["check"]["output"].as_str().unwrap().is_empty(), "{g}");
    let f = entry(&lb, flaky.addr).await;
    assert!(f["check"]["output"].as_str().unwrap().contains("503"), "{f}");
    assert_eq!(entry(&lb, good.addr).await["state"], "healthy");
    assert_eq!(entry(&lb, good.addr).await["check"]["status"], "passing");
    assert_eq!(whos(vip, 12).await, HashSet::from(["good".to_owned()]));

    // Recovery takes `rise` passing checks in a row.
    let probes_before = entry(&lb, flaky.addr).await["check"]["probes"].as_u64().unwrap();
    flaky.set_healthy(true);
    eventually(DEADLINE, "the recovered backend to come back", || async {
        (entry(&lb, flaky.addr).await["state"] == "healthy").then_some(())
    })
    .await;
    let probes_after = entry(&lb, flaky.addr).await["check"]["probes"].as_u64().unwrap();
    assert!(probes_after >= probes_before + 3, "{probes_before} → {probes_after}");
    eventually(DEADLINE, "both HTTP backends to serve", || async {
        (whos(vip, 12).await == HashSet::from(["good".to_owned(), "flaky".to_owned()])).then_some(())
    })
    .await;
    assert_eq!(
        lb.status().await["vips"][0]["table_version"],
        version,
        "check flips never rebuild the table"
    );
    let (_, metrics) = halo_testkit::http::get(admin, "/metrics").await.unwrap();
    let flips = format!(
        "halo_backend_check_flips_total{{vip=\"web\",backend=\"{}\"}} 2",
        flaky.addr
    );
    assert!(metrics.contains(&flips), "missing {flips}:\n{metrics}");

    // An operator's disable is its own state; the check keeps running.
    let (code, _) = halo_testkit::http::admin_post(admin, &format!("/vips/web/backends/{}/disable", flaky.addr))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let f = entry(&lb, flaky.addr).await;
    assert_eq!(f["state"], "disabled");
    assert_eq!(f["check"]["status"], "passing");
    assert_eq!(whos(vip, 6).await, HashSet::from(["good".to_owned()]));
}

#[tokio::test]
async fn checks_follow_the_table_on_reload() {
    let good = HttpBackend::start("good", true).await;
    let sick = HttpBackend::start("sick", false).await;
    let (admin, vip) = addrs();
    let check = "[vip.check]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\nfall = 1\n";
    let lb = Lb::start(&one_vip(admin, vip, &[good.addr], check), admin, &[vip]).await;
    eventually(DEADLINE, "the first backend to be checked", || async {
        (entry(&lb, good.addr).await["check"]["probes"].as_u64() > Some(0)).then_some(())
    })
    .await;

    // A backend added by a reload gets a checker of its own.
    lb.write_config(&one_vip(admin, vip, &[good.addr, sick.addr], check));
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the added backend to fail its check", || async {
        let status = lb.status().await;
        let listed = status["vips"][0]["backends"].as_array().unwrap().len() == 2;
        (listed && entry(&lb, sick.addr).await["state"] == "check_failing").then_some(())
    })
    .await;
    assert_eq!(whos(vip, 6).await, HashSet::from(["good".to_owned()]));

    // Without [vip.check], no checker runs and nothing is held back.
    lb.write_config(&one_vip(admin, vip, &[good.addr, sick.addr], ""));
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "the checks to stop", || async {
        let e = entry(&lb, sick.addr).await;
        (e["check"].is_null() && e["state"] == "healthy").then_some(())
    })
    .await;
    eventually(DEADLINE, "both backends to serve", || async {
        (whos(vip, 12).await == HashSet::from(["good".to_owned(), "sick".to_owned()])).then_some(())
    })
    .await;
}
