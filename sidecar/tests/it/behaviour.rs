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

    let (code, _) = halo_testkit::http::request(admin, "POST", "/drain").await.unwrap();
    assert_eq!(code, 200);
    wait_passing(&client, &[], DEADLINE).await;
    let (code, _) = halo_testkit::http::request(admin, "POST", "/undrain").await.unwrap();
    assert_eq!(code, 200);
    wait_passing(&client, &["web-1"], DEADLINE).await;
    assert!(sidecar.is_running());
    let (code, _) = halo_testkit::http::get(admin, "/health/ready").await.unwrap();
    assert_eq!(code, 200);
}
