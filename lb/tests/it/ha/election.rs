//! Who is elected, and what the standby does meanwhile: one instance
//! elected and the standby forwarding writes (with the pair's token when it
//! has one), a restarted active freeing the lock its predecessor held, two
//! live processes with one id, and an instance that never reaches Consul.

use std::net::SocketAddr;
use std::time::Duration;

use halo_testkit::{eventually, ConsulAgent};
use serde_json::Value;

use super::{assert_never_both_active, ha_config, pair, role, start, wait_role};
use crate::support::*;

#[tokio::test]
async fn one_instance_is_elected_and_the_standby_forwards_writes() {
    let consul = ConsulAgent::start().await;
    let p = pair("elect", &consul.http_url(), &consul.http_url()).await;

    let sa = p.a.status().await;
    let sb = p.b.status().await;
    assert_eq!(sa["serving"], true);
    assert_eq!(sb["serving"], false, "the standby binds nothing");
    let epoch = sa["ha"]["epoch"].as_u64().unwrap();
    assert!(epoch >= 1);
    // Both name the same leader and epoch; the standby keeps warm tables.
    for s in [&sa, &sb] {
        assert_eq!(s["ha"]["leader"]["id"], "a", "{s}");
        assert_eq!(s["ha"]["leader"]["epoch"].as_u64(), Some(epoch));
    }
    assert_eq!(sb["vips"][0]["backends"].as_array().unwrap().len(), 2);
    assert!(greeting(p.vip).await.is_ok(), "the active serves");

    // A write sent to the standby lands on the active.
    let backend = sa["vips"][0]["backends"][0]["address"].as_str().unwrap().to_owned();
    let (code, body) = halo_testkit::http::admin_post(p.b.admin, &format!("/vips/web/backends/{backend}/disable"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let sa = p.a.status().await;
    let disabled: Vec<&Value> = sa["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "disabled")
        .collect();
    assert_eq!(disabled.len(), 1, "the active's table has the backend disabled: {sa}");
    assert_eq!(disabled[0]["address"], backend);
    // The standby's own table is untouched: it only forwarded.
    let sb = p.b.status().await;
    assert!(sb["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["state"] != "disabled"));

    // The role, leader and epoch are in the metrics too.
    let (_, metrics) = halo_testkit::http::get(p.a.admin, "/metrics").await.unwrap();
    assert!(metrics.contains("halo_ha_active 1"), "{metrics}");
    assert!(metrics.contains("halo_ha_info{cluster=\""), "{metrics}");
    assert!(metrics.contains(&format!("halo_ha_epoch {epoch}")), "{metrics}");
}

#[tokio::test]
async fn an_active_restarted_at_once_frees_the_lock_its_predecessor_held() {
    let consul = ConsulAgent::start().await;
    let mut p = pair("restart", &consul.http_url(), &consul.http_url()).await;
    let config = std::fs::read_to_string(&p.a.config_path).unwrap();
    // Killed and restarted within the check TTL: the re-registered check
    // never goes critical, so Consul alone would keep the dead process's
    // session, and its lock, for ever.
    p.a.signal(nix::sys::signal::Signal::SIGKILL);
    p.a.wait_exit().await;
    let restarted = start(&config, p.a.admin).await;
    eventually(DEADLINE, "one instance to be active again", || async {
        let (ra, rb) = (restarted.status().await, p.b.status().await);
        (role(&ra) == "active" || role(&rb) == "active").then_some(())
    })
    .await;
    assert!(greeting(p.vip).await.is_ok(), "the vip is served");
    assert_never_both_active(&restarted.status().await, &p.b.status().await);
    // The dead predecessor's registration still passed when the new process
    // looked for an older twin with its id; it holds the predecessor's probe
    // address itself, so it knew that one was gone: no false conflict, no
    // 2 s spent out of the election (a defect of the earlier detector).
    let log = restarted.log();
    assert!(!log.contains("taken by an older live instance"), "{log}");
    assert!(restarted.status().await["ha"]["id_conflict"].is_null());
}

#[tokio::test]
async fn two_live_instances_with_one_id_do_not_livelock() {
    // Two processes given the same ha.id (two containers with one
    // hostname, a copied config). They once destroyed each other's
    // sessions in a loop: 44 promotions in 12 s, the VIP answering 1 probe
    // in 239.
    let consul = ConsulAgent::start().await;
    let backend = TestBackend::start("one", Behavior::GreetEcho).await;
    let (admin_old, vip) = addrs();
    let admin_young = SocketAddr::from(([127, 0, 0, 1], port()));
    let url = consul.http_url();
    let mut old = start(
        &ha_config("twin", "twins", &url, admin_old, vip, &[backend.addr]),
        admin_old,
    )
    .await;
    wait_role(&old, "active").await;
    let young = start(
        &ha_config("twin", "twins", &url, admin_young, vip, &[backend.addr]),
        admin_young,
    )
    .await;

    // The younger one sees the older, stays out of the election and says so.
    let status = eventually(DEADLINE, "the younger twin to report the conflict", || async {
        let s = young.status().await;
        s["ha"]["id_conflict"].is_string().then_some(s)
    })
    .await;
    assert_ne!(role(&status), "active");
    assert!(
        young.log().contains("taken by an older live instance"),
        "{}",
        young.log()
    );
    // Over some twenty probes the active never changes and the VIP answers.
    for _ in 0..20 {
        assert!(greeting(vip).await.is_ok(), "the vip answers every probe");
        let (so, sy) = (old.status().await, young.status().await);
        assert_eq!(role(&so), "active");
        assert_eq!(so["ha"]["terms"].as_array().unwrap().len(), 1, "one term, no flapping");
        assert_eq!(sy["ha"]["terms"].as_array().unwrap().len(), 0, "the twin never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The older one dies: its check expires and the younger one takes over.
    old.signal(nix::sys::signal::Signal::SIGKILL);
    old.wait_exit().await;
    let status = wait_role(&young, "active").await;
    assert!(status["ha"]["id_conflict"].is_null(), "{status}");
    assert!(greeting(vip).await.is_ok());
}

#[tokio::test]
async fn without_consul_an_instance_never_serves_and_says_why() {
    // Nothing listens there: no heartbeat, no session, no lock.
    let nowhere = format!("http://127.0.0.1:{}", port());
    let backend = TestBackend::start("one", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let lb = start(&ha_config("a", "down", &nowhere, admin, vip, &[backend.addr]), admin).await;
    let status = eventually(DEADLINE, "the Consul error to show", || async {
        let s = lb.status().await;
        s["ha"]["consul_error"].is_string().then_some(s)
    })
    .await;
    assert_eq!(role(&status), "starting");
    assert_eq!(status["serving"], false);
    assert!(
        greeting(vip).await.is_err(),
        "an instance that cannot know it leads does not serve"
    );
}

/// A pair sharing `admin.token_file`: the standby checks a write itself,
/// then forwards it to the active with the token, which the active checks
/// again.
#[tokio::test]
async fn the_standby_forwards_writes_with_the_pairs_token() {
    use crate::admin_auth::{token_file, with_token_file};

    let consul = ConsulAgent::start().await;
    let backends = [
        TestBackend::start("one", Behavior::GreetEcho).await,
        TestBackend::start("two", Behavior::GreetEcho).await,
    ];
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), "token", "shared-pair-token", 0o600);
    let (admin_a, vip) = addrs();
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let config = |id: &str, admin| {
        with_token_file(
            &ha_config(id, "tokened", &consul.http_url(), admin, vip, &backend_addrs),
            admin,
            &token,
        )
    };
    let a = start(&config("a", admin_a), admin_a).await;
    wait_role(&a, "active").await;
    let b = start(&config("b", admin_b), admin_b).await;
    wait_role(&b, "standby").await;

    let path = format!("/vips/web/backends/{}/disable", backends[0].addr);
    // Refused by the standby itself, without reaching the active.
    let (code, body) = halo_testkit::http::admin_post(b.admin, &path).await.unwrap();
    assert_eq!(code, 401, "{body}");
    assert!(!b.log().contains("write forwarded to the active"), "{}", b.log());
    let (code, body) = halo_testkit::http::request_with_headers(
        b.admin,
        "POST",
        &path,
        &[("Authorization", "Bearer shared-pair-token")],
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let sa = a.status().await;
    let disabled = sa["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "disabled")
        .count();
    assert_eq!(disabled, 1, "the active applied the forwarded write: {sa}");
    let log = a.log();
    let line = log
        .lines()
        .find(|l| l.contains("backend state set by operator"))
        .unwrap();
    assert!(
        line.contains("auth=\"token\"") && line.contains("forwarded_by=\"b\""),
        "{line}"
    );
    assert!(!a.log().contains("shared-pair-token") && !b.log().contains("shared-pair-token"));
}
