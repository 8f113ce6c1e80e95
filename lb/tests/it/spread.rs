//! The fault-domain spread (`/status` `spread`, `halo_vip_healthy_*`) as
//! health moves, and the per-backend series of `/metrics` over backend churn.

use std::net::{Ipv4Addr, SocketAddr};

use halo_testkit::eventually;

use crate::support::*;

/// The value of the one sample of `metric` whose labels are exactly `labels`.
fn sample(text: &str, metric: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{metric}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

async fn metrics(lb: &Lb) -> String {
    let (code, text) = halo_testkit::http::get(lb.admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    text
}

/// Three backends: a1 and a2 in zone-a (racks r1, r2), b1 in zone-b (rack
/// r3), all in region eu except b1 (us). Killing b1 ejects it (no table
/// rebuild): the spread drops to one zone, one region, two racks, and comes
/// back when b1 does.
#[tokio::test]
async fn the_spread_follows_health_without_a_table_rebuild() {
    let a1 = TestBackend::start("a1", Behavior::GreetEcho).await;
    let a2 = TestBackend::start("a2", Behavior::GreetEcho).await;
    let mut b1 = TestBackend::start("b1", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nretries = 2\n\
         backends = [{{ address = \"{}\", zone = \"zone-a\", region = \"eu\", rack = \"r1\" }}, \
         {{ address = \"{}\", zone = \"zone-a\", region = \"eu\", rack = \"r2\" }}, \
         {{ address = \"{}\", zone = \"zone-b\", region = \"us\", rack = \"r3\" }}]\n\
         [vip.passive]\neject_after = 1\nbase_ejection = \"1s\"\nmax_ejection = \"1s\"\n",
        a1.addr, a2.addr, b1.addr
    );
    let lb = Lb::start(&config, admin, &[vip]).await;

    let status = lb.typed_status().await;
    let spread = status.vips[0].spread;
    assert_eq!(
        (
            spread.zones,
            spread.regions,
            spread.racks,
            spread.healthy_backends,
            spread.listed_zones
        ),
        (2, 2, 3, 3, 2)
    );
    let b = status.vips[0]
        .backends
        .iter()
        .find(|b| b.address == b1.addr.to_string())
        .unwrap();
    assert_eq!((b.region.as_deref(), b.rack.as_deref()), (Some("us"), Some("r3")));
    let text = metrics(&lb).await;
    for (metric, want) in [
        ("halo_vip_healthy_zones", 2.0),
        ("halo_vip_healthy_regions", 2.0),
        ("halo_vip_healthy_racks", 3.0),
        ("halo_vip_healthy_backends", 3.0),
        ("halo_vip_zones", 2.0),
    ] {
        assert_eq!(sample(&text, metric, "vip=\"web\""), Some(want), "{metric}:\n{text}");
    }
    let version = status.vips[0].table_version;

    b1.kill_and_wait().await;
    eventually(DEADLINE, "b1 to be ejected and the spread to shrink", || async {
        greeting(vip).await.unwrap();
        let text = metrics(&lb).await;
        (sample(&text, "halo_vip_healthy_zones", "vip=\"web\"") == Some(1.0)).then_some(text)
    })
    .await;
    let text = metrics(&lb).await;
    let b1_up = format!("vip=\"web\",backend=\"{}\"", b1.addr);
    assert_eq!(sample(&text, "halo_backend_up", &b1_up), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "halo_vip_backends", "vip=\"web\",state=\"ejected\""),
        Some(1.0),
        "{text}"
    );
    let status = lb.typed_status().await;
    let spread = status.vips[0].spread;
    if spread.healthy_backends == 2 {
        // Still ejected (it lasts a second): one zone, one region, two racks.
        assert_eq!(
            (spread.zones, spread.regions, spread.racks, spread.listed_zones),
            (1, 1, 2, 2)
        );
    }
    assert_eq!(status.vips[0].table_version, version, "health moved, the table did not");

    // b1 comes back: once its ejection runs out and it connects, zone-b counts again.
    let _b1 = TestBackend::start_at(b1.addr, "b1", Behavior::GreetEcho).await;
    eventually(DEADLINE, "the spread to recover", || async {
        greeting(vip).await.unwrap();
        let s = lb.typed_status().await.vips[0].spread;
        (s.zones == 2 && s.regions == 2 && s.racks == 3).then_some(())
    })
    .await;
    drop((a1, a2));
}

/// 1,000 backends pass through a VIP, 100 at a time, by config reloads.
/// The per-backend series follow the table: after every reload there are
/// exactly those of the 100 current backends, and the whole `/metrics` does
/// not grow.
#[tokio::test]
async fn backend_series_leave_with_their_backend() {
    const PER_ROUND: u16 = 100;
    const ROUNDS: u16 = 10;
    // Per backend: connections, active connections, up, connect failures, ejections.
    const SERIES_PER_BACKEND: usize = 5;
    let (admin, vip) = addrs();
    // Addresses nothing connects to (no traffic, no checks): 127.0.0.2..,
    // distinct in every round.
    let round = |r: u16| -> Vec<SocketAddr> {
        (0..PER_ROUND)
            .map(|i| SocketAddr::from((Ipv4Addr::new(127, 0, 0, 2), 20_000 + r * PER_ROUND + i)))
            .collect()
    };
    let lb = Lb::start(&one_vip(admin, vip, &round(0), ""), admin, &[vip]).await;
    let backend_series = |text: &str| text.lines().filter(|l| l.starts_with("halo_backend_")).count();
    let all_series = |text: &str| text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();

    let first = metrics(&lb).await;
    assert_eq!(
        backend_series(&first),
        SERIES_PER_BACKEND * usize::from(PER_ROUND),
        "{first}"
    );
    let mut sizes = vec![all_series(&first)];
    for r in 1..ROUNDS {
        let addrs = round(r);
        lb.write_config(&one_vip(admin, vip, &addrs, ""));
        lb.signal(nix::sys::signal::Signal::SIGHUP);
        let want: Vec<String> = {
            let mut v: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            v.sort();
            v
        };
        eventually(DEADLINE, "the reload to swap the table", || async {
            (table_addrs(&lb).await == want).then_some(())
        })
        .await;
        let text = metrics(&lb).await;
        assert_eq!(
            backend_series(&text),
            SERIES_PER_BACKEND * usize::from(PER_ROUND),
            "round {r}: only the current backends"
        );
        let old = format!("backend=\"{}\"", round(r - 1)[0]);
        assert!(!text.contains(&old), "round {r}: {old} is gone");
        sizes.push(all_series(&text));
    }
    let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    println!("series in /metrics over {} backends: {sizes:?}", ROUNDS * PER_ROUND);
    // A reload may add a handful of fixed series (a first reload counter);
    // nothing grows with the backends that came and went.
    assert!(max - min <= 10, "/metrics grew over churn: {sizes:?}");
}
