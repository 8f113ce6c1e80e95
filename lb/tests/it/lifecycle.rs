use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn sighup_applies_a_good_file_and_keeps_serving_on_a_bad_one() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let b = TestBackend::start("b", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let lb = Lb::start(&one_vip(admin, vip, &[a.addr], ""), admin, &[vip]).await;
    assert_eq!(greeting(vip).await.unwrap().0, "a");

    // A good file: now only b, and a second VIP appears.
    let vip2 = std::net::SocketAddr::from(([127, 0, 0, 1], port()));
    let good = format!(
        "{}\n[[vip]]\nname = \"second\"\nlisten = \"{vip2}\"\nbackends = [\"{}\"]\n",
        one_vip(admin, vip, &[b.addr], ""),
        a.addr
    );
    lb.write_config(&good);
    lb.signal(Signal::SIGHUP);
    halo_testkit::eventually(DEADLINE, "the reload to route to b", || async {
        (greeting(vip).await.ok()?.0 == "b").then_some(())
    })
    .await;
    assert_eq!(greeting(vip2).await.unwrap().0, "a", "the new vip serves");

    // A bad file: logged, and the running config keeps serving.
    lb.write_config("[[vip]]\nname = \"web\"\nlisten = \"nowhere\"\n");
    lb.signal(Signal::SIGHUP);
    halo_testkit::eventually(DEADLINE, "the rejection to be logged", || async {
        lb.log().contains("reload rejected").then_some(())
    })
    .await;
    let log = lb.log();
    assert!(log.contains("vip[0].listen"), "the log names the field:\n{log}");
    for _ in 0..5 {
        assert_eq!(greeting(vip).await.unwrap().0, "b");
    }
    assert_eq!(greeting(vip2).await.unwrap().0, "a");
}

#[tokio::test]
async fn sigterm_drains_live_connections_then_exits_cleanly() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let mut lb = Lb::start(&one_vip(admin, vip, &[a.addr], ""), admin, &[vip]).await;
    let (_, mut live) = greeting(vip).await.unwrap();

    lb.signal(Signal::SIGTERM);
    // New connections are refused once the listener is closed...
    halo_testkit::eventually(DEADLINE, "the listener to close", || async {
        TcpStream::connect(vip).await.is_err().then_some(())
    })
    .await;
    let (code, _) = halo_testkit::http::get(admin, "/health").await.unwrap();
    assert_eq!(code, 503, "health says draining");
    // ...while the live one keeps working.
    live.get_mut().write_all(b"still here\n").await.unwrap();
    let mut line = String::new();
    live.read_line(&mut line).await.unwrap();
    assert_eq!(line, "still here\n");
    assert!(lb.is_running(), "waits for the live connection");

    drop(live);
    let status = lb.wait_exit().await;
    assert!(status.success(), "{status}");
    assert!(lb.log().contains("drained: every connection finished"));
}

#[tokio::test]
async fn the_drain_timeout_bounds_the_wait() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let cfg = one_vip(admin, vip, &[a.addr], "").replace("drain_timeout = \"10s\"", "drain_timeout = \"300ms\"");
    let mut lb = Lb::start(&cfg, admin, &[vip]).await;
    let (_, _live) = greeting(vip).await.unwrap();
    lb.signal(Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), lb.wait_exit())
        .await
        .unwrap();
    assert!(status.success());
    assert!(lb.log().contains("drain timeout"));
}

#[tokio::test]
async fn raising_the_connection_limit_on_reload_wakes_paused_accepting() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let lb = Lb::start(&one_vip(admin, vip, &[a.addr], "max_connections = 1"), admin, &[vip]).await;
    let (_, _held) = greeting(vip).await.unwrap();
    let waiting = tokio::spawn(greeting(vip));
    tokio::time::sleep(Duration::from_millis(300)).await; // a negative check needs a window
    assert!(!waiting.is_finished(), "served beyond the limit");

    lb.write_config(&one_vip(admin, vip, &[a.addr], "max_connections = 5"));
    lb.signal(Signal::SIGHUP);
    let (name, _conn) = tokio::time::timeout(DEADLINE, waiting).await.unwrap().unwrap().unwrap();
    assert_eq!(
        name, "a",
        "served once the limit rose, with the first connection still open"
    );
}

async fn healthcheck(lb: &Lb) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_halo-lb"));
    cmd.arg("--config")
        .arg(&lb.config_path)
        .args(["healthcheck", "--timeout", "1s"]);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// Under systemd (`Type=notify`) a lone balancer says READY=1 once it
/// serves and STOPPING=1 on SIGTERM; `halo-lb healthcheck` follows
/// `/health` (200 serving, 503 draining, nothing once gone).
#[tokio::test]
async fn systemd_hears_ready_and_stopping_and_the_healthcheck_follows_health() {
    let a = TestBackend::start("a", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let notify = halo_testkit::notify::NotifySocket::bind();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_halo-lb"));
    cmd.env("NOTIFY_SOCKET", notify.path());
    let mut lb = Lb::start_command(cmd, &one_vip(admin, vip, &[a.addr], ""), admin, &[vip]).await;

    let ready = notify.next(DEADLINE).await;
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=serving"),
        "{ready:?}"
    );
    let out = healthcheck(&lb).await;
    assert!(out.status.success(), "{out:?}");

    let (_, live) = greeting(vip).await.unwrap();
    lb.signal(Signal::SIGTERM);
    notify.wait_for("STOPPING=1", DEADLINE).await;
    let out = healthcheck(&lb).await;
    assert!(!out.status.success(), "draining is not healthy: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("503"), "{out:?}");

    drop(live);
    assert!(lb.wait_exit().await.success());
    assert!(
        !healthcheck(&lb).await.status.success(),
        "nothing answers once it exited"
    );
}
