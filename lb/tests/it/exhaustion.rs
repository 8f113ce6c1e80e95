//! The process's own resources running out: more clients than file
//! descriptors. Such errors are local and must never be blamed on a
//! backend; clients wait (in the backlog, or parked) and are served once
//! descriptors free up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

use crate::support::*;

/// Sums every sample of `metric` whose labels contain `label` in
/// Prometheus text.
fn metric_sum(text: &str, metric: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn running_out_of_descriptors_ejects_no_backend_and_everyone_is_served() {
    const CLIENTS: usize = 120;
    const NOFILE: u32 = 96;
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let config = format!("workers = 1\n{}", one_vip(admin, vip, &[a.addr, b.addr], ""));
    let lb = Lb::start_with_fd_limit(&config, admin, &[vip], NOFILE).await;
    assert!(
        lb.log().contains("need more file descriptors than RLIMIT_NOFILE"),
        "max_connections (10000) past the limit is warned about at start:\n{}",
        lb.log()
    );

    // Every client holds its connection once greeted, until released: each
    // proxied connection costs halo-lb two descriptors, so at most ~NOFILE/2
    // can be served at once and the rest must wait.
    let (release, released) = tokio::sync::watch::channel(false);
    let greeted = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let (greeted, mut released) = (Arc::clone(&greeted), released.clone());
        clients.spawn(async move {
            let stream = TcpStream::connect(vip)
                .await
                .map_err(|e| format!("client {i}: connect: {e}"))?;
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(60), reader.read_line(&mut line))
                .await
                .map_err(|_| format!("client {i}: no greeting in 60 s"))?
                .map_err(|e| format!("client {i}: {e}"))?;
            if n == 0 {
                return Err(format!("client {i}: closed without being served"));
            }
            greeted.fetch_add(1, Ordering::Relaxed);
            released
                .wait_for(|r| *r)
                .await
                .map_err(|_| format!("client {i}: test ended"))?;
            Ok(line.trim().to_owned())
        });
    }

    // The limit is reached: halo-lb says so (rate-limited) and pauses.
    halo_testkit::eventually(DEADLINE, "halo-lb to run out of descriptors, serving some", || async {
        (lb.log().contains("out of local resources") && greeted.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    let served_at_limit = greeted.load(Ordering::Relaxed);
    assert!(
        served_at_limit < CLIENTS,
        "not every client can be served at once at the limit: {served_at_limit}"
    );

    // Descriptors free up: everyone is served.
    release.send_replace(true);
    let mut names = std::collections::HashMap::new();
    while let Some(result) = clients.join_next().await {
        let name = result.unwrap().unwrap_or_else(|e| panic!("{e}\n{}", lb.log()));
        *names.entry(name).or_insert(0) += 1;
    }
    assert_eq!(names.values().sum::<usize>(), CLIENTS, "{names:?}");
    assert_eq!(names.len(), 2, "both backends served: {names:?}");

    // No backend was blamed for it.
    let (code, metrics) = halo_testkit::http::get(admin, "/metrics")
        .await
        .expect("/metrics answers");
    assert_eq!(code, 200);
    assert!(
        metric_sum(&metrics, "halo_local_resource_errors_total", "") > 0.0,
        "the shortage was counted:\n{metrics}"
    );
    for backend in [a.addr, b.addr] {
        let label = format!("backend=\"{backend}\"");
        assert_eq!(
            metric_sum(&metrics, "halo_backend_ejections_total", &label),
            0.0,
            "{backend}"
        );
        assert_eq!(
            metric_sum(&metrics, "halo_backend_connect_failures_total", &label),
            0.0,
            "{backend}"
        );
    }
    assert_eq!(metric_sum(&metrics, "halo_vip_no_backend_total", ""), 0.0);
    let status = lb.status().await;
    for backend in status["vips"][0]["backends"].as_array().unwrap() {
        assert_eq!(backend["state"], "healthy", "{backend}");
    }
    // Rate-limited: a handful of warnings, not dozens a second.
    let warnings = lb.log().matches("out of local resources").count();
    assert!(warnings < 30, "{warnings} warnings");
}
