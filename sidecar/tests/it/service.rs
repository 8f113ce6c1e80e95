//! Living under a service manager: systemd's readiness messages, the
//! `healthcheck` and `drain --wait` subcommands.

use std::process::Output;

use halo_consul::Client;
use halo_testkit::ConsulAgent;

use crate::*;

async fn run(sidecar: &Sidecar, args: &[&str]) -> Output {
    let mut cmd = sidecar_command();
    cmd.arg("--config").arg(&sidecar.config_path).args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn systemd_hears_ready_once_registered_and_stopping_on_sigterm() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let app = App::start().await;
    let admin = admin_addr();
    let notify = halo_testkit::notify::NotifySocket::bind();
    let mut sidecar = Sidecar::start_with_env(
        &config(&consul, &app, admin, "500ms", "1s"),
        admin,
        &[("NOTIFY_SOCKET", notify.path().as_os_str())],
    )
    .await;

    let mut message = notify.next(DEADLINE).await;
    while !message.contains("READY=1") {
        assert!(
            message.starts_with("STATUS="),
            "only status lines before READY: {message:?}"
        );
        message = notify.next(DEADLINE).await;
    }
    assert!(
        client.agent_service("web-1").await.unwrap().is_some(),
        "READY=1 came before the agent had the registration"
    );

    sidecar.sigterm();
    notify.wait_for("STOPPING=1", DEADLINE).await;
    assert!(sidecar.wait_exit().await.success());
}

#[tokio::test]
async fn healthcheck_follows_readiness_and_liveness() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let app = App::start().await;
    let admin = admin_addr();
    let mut sidecar = Sidecar::start(&config(&consul, &app, admin, "200ms", "1s"), admin).await;
    wait_passing(&client, &["web-1"], DEADLINE).await;

    assert!(run(&sidecar, &["healthcheck"]).await.status.success());
    app.set_healthy(false);
    eventually(DEADLINE, "healthcheck to fail once the app fails", || async {
        let out = run(&sidecar, &["healthcheck"]).await;
        (!out.status.success()).then_some(out)
    })
    .await;
    let live = run(&sidecar, &["healthcheck", "--live"]).await;
    assert!(live.status.success(), "live while the app is sick: {live:?}");

    sidecar.kill();
    let out = run(&sidecar, &["healthcheck", "--live", "--timeout", "500ms"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/health/live"), "{out:?}");
}

#[tokio::test]
async fn drain_wait_returns_with_the_instance_out_of_the_healthy_view() {
    let consul = ConsulAgent::start().await;
    let client = Client::from_address(consul.http_url()).unwrap();
    let app = App::start().await;
    let admin = admin_addr();
    // A long grace: the command must return on maintenance, not on exit.
    let mut sidecar = Sidecar::start(&config(&consul, &app, admin, "200ms", "30s"), admin).await;
    wait_passing(&client, &["web-1"], DEADLINE).await;

    let out = run(&sidecar, &["drain", "--wait", "--timeout", "20s"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("maintenance"), "{out:?}");
    // When it returned, no healthy view listed the instance any more.
    assert_eq!(passing(&client).await.unwrap(), Vec::<String>::new());
    assert!(sidecar.is_running(), "still in its grace period");

    // With no sidecar running there is nothing to drain through: an error,
    // not a silent success.
    sidecar.kill();
    let out = run(&sidecar, &["drain", "--wait", "--timeout", "2s"]).await;
    assert!(!out.status.success(), "no sidecar to ask: POST /drain fails: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/drain"), "{out:?}");
}
