use std::time::{Duration, Instant};

use halo_consul::{Client, HealthQuery, QueryOptions, Weights};
use halo_testkit::{eventually, ConsulAgent};

use crate::*;

#[tokio::test]
async fn registers_with_the_right_fields_and_readiness_follows_the_checks() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let app = App::start().await;
    let admin = admin_addr();
    let _sidecar = Sidecar::start(&config(&consul, &app, admin, "500ms", "1s"), admin).await;

    wait_passing(&client, &["web-1"], DEADLINE).await;
    let svc = client.agent_service("web-1").await.unwrap().unwrap();
    assert_eq!(svc.service, "web");
    assert_eq!((svc.address.as_str(), svc.port), ("127.0.0.1", app.addr.port()));
    assert_eq!(svc.tags, ["v1"]);
    assert_eq!(svc.meta["zone"], "zone-a");
    assert_eq!(svc.meta["region"], "region-1");
    assert_eq!(svc.meta["rack"], "r1");
    assert_eq!(
        svc.weights,
        Weights {
            passing: 10,
            warning: 1
        }
    );
    let checks = client.agent_checks().await.unwrap();
    let check = &checks["web-1:http"];
    assert_eq!(check.service_id, "web-1");
    assert!(check.output.contains("200"), "probe output pushed: {}", check.output);

    let (code, body) = halo_testkit::http::get(admin, "/health/ready").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["checks"][0]["name"], "http");
    assert_eq!(ready["checks"][0]["status"], "passing");
    assert!(ready["checks"][0]["since"].as_str().unwrap().ends_with('Z'));

    app.set_healthy(false);
    eventually(DEADLINE, "/health/ready to say 503", || async {
        let (code, body) = halo_testkit::http::get(admin, "/health/ready").await?;
        (code == 503 && body.contains("critical") && body.contains("500")).then_some(())
    })
    .await;
    let (code, _) = halo_testkit::http::get(admin, "/health/live").await.unwrap();
    assert_eq!(code, 200, "liveness is not readiness");

    let (code, status) = halo_testkit::http::get(admin, "/status").await.unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["consul"]["registered"], true, "{status}");
    assert_eq!(status["consul"]["refusals"], 0, "{status}");
    assert_eq!(status["draining"], false, "{status}");
    assert!(checks.contains_key("web-1:sidecar"), "the liveness check is registered");

    let (code, metrics) = halo_testkit::http::get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for name in [
        "halo_check_up{check=\"http\"}",
        "halo_probe_duration_seconds",
        "halo_sidecar_registered",
    ] {
        assert!(metrics.contains(name), "missing {name}:\n{metrics}");
    }
}

#[tokio::test]
async fn health_flips_reach_consul_within_an_interval_and_a_second() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let app = App::start().await;
    let admin = admin_addr();
    let interval = Duration::from_secs(1);
    let _sidecar = Sidecar::start(&config(&consul, &app, admin, "1s", "1s"), admin).await;
    wait_passing(&client, &["web-1"], DEADLINE).await;

    for healthy in [false, true, false, true] {
        app.set_healthy(healthy);
        let flipped = Instant::now();
        let want: &[&str] = if healthy { &["web-1"] } else { &[] };
        // fall = rise = 1: one probe, which starts within one interval.
        wait_passing(&client, want, interval + Duration::from_secs(1)).await;
        eprintln!("healthy={healthy}: visible in ?passing after {:?}", flipped.elapsed());
    }
}

#[tokio::test]
async fn survives_the_agent_going_away_and_registers_again_when_it_returns() {
    let mut consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let app = App::start().await;
    let admin = admin_addr();
    let mut sidecar = Sidecar::start(&config(&consul, &app, admin, "500ms", "1s"), admin).await;
    wait_passing(&client, &["web-1"], DEADLINE).await;

    consul.stop();
    // The health endpoints keep answering while Consul is away.
    for _ in 0..5 {
        let (code, _) = halo_testkit::http::get(admin, "/health/ready")
            .await
            .expect("admin answers");
        assert_eq!(code, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sidecar.is_running());

    // A dev agent restarts empty: the sidecar must notice and register again.
    consul.restart().await;
    wait_passing(&client, &["web-1"], DEADLINE).await;
    assert!(sidecar.log().contains("registering again") || sidecar.log().contains("registered"));
}

#[tokio::test]
async fn sigterm_drains_out_of_passing_before_exiting_then_deregisters() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let app = App::start().await;
    let admin = admin_addr();
    let mut sidecar = Sidecar::start(&config(&consul, &app, admin, "500ms", "2s"), admin).await;
    wait_passing(&client, &["web-1"], DEADLINE).await;

    sidecar.sigterm();
    wait_passing(&client, &[], DEADLINE).await;
    assert!(
        sidecar.is_running(),
        "left ?passing while still running (the grace period)"
    );
    let (code, _) = halo_testkit::http::get(admin, "/health/ready").await.unwrap();
    assert_eq!(code, 503, "not ready while draining");

    let status = sidecar.wait_exit().await;
    assert!(status.success(), "{status}");
    assert_eq!(
        client.agent_service("web-1").await.unwrap(),
        None,
        "gone from the agent"
    );
    let all = client
        .health_service("web", HealthQuery::all(), QueryOptions::default())
        .await
        .unwrap();
    assert!(all.value.is_empty(), "gone from the catalog");
}

#[tokio::test]
async fn post_drain_then_undrain_returns_the_instance_to_service() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let app = App::start().await;
    let admin = admin_addr();
    let mut sidecar = Sidecar::start(&config(&consul, &app, admin, "500ms", "30s"), admin).await;
    wait_passing(&client, &["web-1"], DEADLINE).await;

    let (code, _) = halo_testkit::http::admin_post(admin, "/drain").await.unwrap();
    assert_eq!(code, 200);
    let log = sidecar.log();
    let line = log
        .lines()
        .find(|l| l.contains("drain requested through the admin API"))
        .expect("the write is logged");
    assert!(line.contains("client=127.0.0.1:"), "the log names who asked: {line}");
    wait_passing(&client, &[], DEADLINE).await;
    let (code, _) = halo_testkit::http::admin_post(admin, "/undrain").await.unwrap();
    assert_eq!(code, 200);
    wait_passing(&client, &["web-1"], DEADLINE).await;
    assert!(sidecar.is_running());
    let (code, _) = halo_testkit::http::get(admin, "/health/ready").await.unwrap();
    assert_eq!(code, 200);
}

/// SIGTERM while the agent hangs (a cut fault proxy: requests get no
/// answer): the drain still ends within the grace plus the shutdown margin,
/// and the log says what was given up. It took 16.9 s with a 1 s grace.
#[tokio::test]
async fn sigterm_with_a_hung_agent_exits_within_grace_plus_margin() {
    let consul = ConsulAgent::start().await;
    let proxy = halo_testkit::fault::FaultProxy::start(consul.http_addr()).await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let app = App::start().await;
    let admin = admin_addr();
    let grace = Duration::from_secs(1);
    let text = config(&consul, &app, admin, "500ms", "1s").replace(&consul.http_url(), &proxy.http_url());
    let mut sidecar = Sidecar::start(&text, admin).await;
    wait_passing(&client, &["web-1"], DEADLINE).await;

    proxy.cut();
    let sent = Instant::now();
    sidecar.sigterm();
    let status = sidecar.wait_exit().await;
    let took = sent.elapsed();
    eprintln!("exit {took:?} after SIGTERM with the agent hung");
    assert!(status.success(), "{status}");
    let bound = grace + halo_sidecar::SHUTDOWN_MARGIN;
    assert!(
        took < bound + Duration::from_secs(2),
        "took {took:?}, bound {bound:?} (+2 s for scheduling):\n{}",
        sidecar.log()
    );
    let log = sidecar.log();
    assert!(log.contains("gave up deregistering"), "{log}");
}

/// A sick app stays registered (critical) however long it stays sick; a dead
/// sidecar's workload is reaped. Real time against a real agent: Consul's
/// minimum `DeregisterCriticalServiceAfter` is 1 min and its reaper runs
/// every 30 s, so this takes 60-95 s. (Consul 1.8.7's /v1/agent/checks shows
/// an empty `Definition` for TTL checks, so the setting cannot be read back.)
#[tokio::test]
async fn a_sick_app_stays_registered_while_a_dead_sidecar_is_reaped() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let sick = App::start().await;
    sick.set_healthy(false);
    let other = App::start().await;
    let (admin1, admin2) = (admin_addr(), admin_addr());
    let ttl = "\ncheck_ttl = \"1s\"\n";
    let with_ttl = |text: String| text.replace("weights = {", &format!("{ttl}weights = {{"));
    let sick_sidecar = Sidecar::start(&with_ttl(config(&consul, &sick, admin1, "500ms", "1s")), admin1).await;
    let mut doomed = Sidecar::start(
        &with_ttl(config(&consul, &other, admin2, "500ms", "1s").replace("id = \"web-1\"", "id = \"web-2\"")),
        admin2,
    )
    .await;
    wait_passing(&client, &["web-2"], DEADLINE).await;
    eventually(DEADLINE, "web-1's app check to be critical in Consul", || async {
        let checks = client.agent_checks().await.ok()?;
        (checks.get("web-1:http")?.status == halo_consul::CheckStatus::Critical).then_some(())
    })
    .await;
    // Both carry the liveness check.
    let checks = client.agent_checks().await.unwrap();
    for id in ["web-1:sidecar", "web-2:sidecar"] {
        assert_eq!(checks[id].status, halo_consul::CheckStatus::Passing, "{id}");
    }

    // kill -9: web-2's heartbeats stop, all its checks go critical after 1 s.
    doomed.kill();
    let killed = Instant::now();
    // web-1's app check has been critical longer than web-2's checks, so
    // with the old registration (deregister_critical_after on the app check)
    // web-1 was reaped in the same pass or earlier, then re-registered.
    let web1_missing = std::sync::atomic::AtomicU32::new(0);
    eventually(Duration::from_secs(150), "web-2 to be reaped", || async {
        if let Ok(None) = client.agent_service("web-1").await {
            web1_missing.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        matches!(client.agent_service("web-2").await, Ok(None)).then_some(())
    })
    .await;
    let web1_missing = web1_missing.into_inner();
    eprintln!("web-2 reaped {:?} after kill -9", killed.elapsed());
    assert_eq!(
        web1_missing,
        0,
        "the sick app's instance was reaped:\n{}",
        sick_sidecar.log()
    );
    let svc = client.agent_service("web-1").await.unwrap();
    assert!(svc.is_some(), "web-1 is still registered");
    let checks = client.agent_checks().await.unwrap();
    assert_eq!(checks["web-1:http"].status, halo_consul::CheckStatus::Critical);
    assert!(
        !sick_sidecar.log().contains("registering again"),
        "{}",
        sick_sidecar.log()
    );
}
