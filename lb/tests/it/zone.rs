//! Zone-aware routing end to end: backends in two zones go down one by one
//! (their connects fail, so passive ejection takes them out) and come back.

use std::collections::HashSet;
use std::net::SocketAddr;

use halo_testkit::eventually;

use crate::support::*;

/// Three backends in zone-a (the balancer's), two in zone-b. With
/// `zone_min_healthy = 0.6`, two healthy local backends of three keep
/// traffic local; one is too few. Ejections last a second, so backends that
/// come back are retried soon.
fn config(admin: SocketAddr, vip: SocketAddr, local: &[SocketAddr], remote: &[SocketAddr]) -> String {
    let backends: Vec<String> = local
        .iter()
        .map(|a| format!("{{ address = \"{a}\", zone = \"zone-a\" }}"))
        .chain(
            remote
                .iter()
                .map(|a| format!("{{ address = \"{a}\", zone = \"zone-b\" }}")),
        )
        .collect();
    format!(
        "zone = \"zone-a\"\n[admin]\nlisten = \"{admin}\"\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\n\
         backends = [{}]\nzone_min_healthy = 0.6\nretries = 4\n\
         [vip.passive]\neject_after = 1\nbase_ejection = \"1s\"\nmax_ejection = \"1s\"\n",
        backends.join(", ")
    )
}

async fn backend_state(lb: &Lb, addr: SocketAddr) -> String {
    let status = lb.status().await;
    status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .map(|b| b["state"].as_str().unwrap().to_owned())
        .unwrap()
}

fn set(names: &[&str]) -> HashSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn traffic_stays_in_zone_while_enough_local_backends_are_healthy() {
    let mut a1 = TestBackend::start("a1", Behavior::GreetEcho).await;
    let mut a2 = TestBackend::start("a2", Behavior::GreetEcho).await;
    let _a3 = TestBackend::start("a3", Behavior::GreetEcho).await;
    let _b1 = TestBackend::start("b1", Behavior::GreetEcho).await;
    let _b2 = TestBackend::start("b2", Behavior::GreetEcho).await;
    let (local, remote) = ([a1.addr, a2.addr, _a3.addr], [_b1.addr, _b2.addr]);
    let (admin, vip) = addrs();
    let lb = Lb::start(&config(admin, vip, &local, &remote), admin, &[vip]).await;
    let zone_a = set(&["a1", "a2", "a3"]);

    // All healthy: only zone-a serves.
    let seen = served_by(vip, 30).await;
    assert_eq!(seen, zone_a, "every local backend, and only those");
    let zone = lb.status().await["vips"][0]["zone"].clone();
    assert_eq!(zone["zone"], "zone-a");
    assert_eq!(zone["routing"], "local");
    assert_eq!(
        (zone["local_backends"].clone(), zone["needed"].clone()),
        (3.into(), 2.into())
    );

    // a1 down: its connects fail and eject it; 2 of 3 still meet the
    // fraction, so traffic stays in zone-a (retries go to a2 and a3).
    a1.kill_and_wait().await;
    eventually(DEADLINE, "a1 to be ejected", || async {
        greeting(vip).await.unwrap();
        (backend_state(&lb, a1.addr).await == "ejected").then_some(())
    })
    .await;
    let seen = served_by(vip, 30).await;
    assert!(seen.is_subset(&set(&["a2", "a3"])), "still local: {seen:?}");

    // a2 down too: one healthy local backend is below the fraction, so
    // traffic spills over to zone-b.
    a2.kill_and_wait().await;
    eventually(DEADLINE, "traffic to spill over to zone-b", || async {
        let seen = served_by(vip, 6).await;
        (seen.contains("b1") || seen.contains("b2")).then_some(())
    })
    .await;
    eventually(DEADLINE, "/status to say all zones", || async {
        greeting(vip).await.unwrap();
        (lb.status().await["vips"][0]["zone"]["routing"] == "all_zones").then_some(())
    })
    .await;
    let seen = served_by(vip, 30).await;
    assert!(
        seen.is_subset(&set(&["a3", "b1", "b2"])) && seen.len() >= 2,
        "every zone, no dead backend: {seen:?}"
    );

    // Both come back: once their ejections run out, traffic returns to zone-a.
    let a1 = TestBackend::start_at(a1.addr, "a1", Behavior::GreetEcho).await;
    let _a2 = TestBackend::start_at(a2.addr, "a2", Behavior::GreetEcho).await;
    eventually(DEADLINE, "routing to return to the local zone", || async {
        greeting(vip).await.unwrap();
        let zone = lb.status().await["vips"][0]["zone"].clone();
        (zone["routing"] == "local" && zone["healthy_local"] == 3).then_some(())
    })
    .await;
    eventually(DEADLINE, "every local backend to serve again", || async {
        (served_by(vip, 30).await == zone_a).then_some(())
    })
    .await;
    assert_eq!(backend_state(&lb, a1.addr).await, "healthy");
}

#[test]
fn zone_min_healthy_must_be_a_fraction() {
    let e = halo_lb::Config::parse(
        "zone = \"zone-a\"\n[[vip]]\nname = \"w\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"]\nzone_min_healthy = 1.5\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("vip[0].zone_min_healthy: 1.5 is not between 0 and 1"), "{e}");
    let e = halo_lb::Config::parse(
        "zone = \"\"\n[[vip]]\nname = \"w\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"]\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("zone: \"\" must be non-empty"), "{e}");
}
