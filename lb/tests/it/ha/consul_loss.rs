//! Losing Consul: the active cut off from its agent stops serving before
//! the standby starts (20 rounds), and losing the Consul leader never makes
//! two actives nor empties a table.

use std::net::SocketAddr;
use std::time::Duration;

use halo_testkit::fault::FaultProxy;
use halo_testkit::{eventually, ConsulAgent};
use serde_json::Value;

use super::{assert_never_both_active, pair, role, start, terms, wait_role};
use crate::support::*;

#[tokio::test]
async fn an_active_cut_off_from_consul_stops_before_the_standby_starts_20_times() {
    let consul = ConsulAgent::start().await;
    let to_a = FaultProxy::start(consul.http_addr()).await;
    let to_b = FaultProxy::start(consul.http_addr()).await;
    let p = pair("cut", &to_a.http_url(), &to_b.http_url()).await;
    let mut epochs = Vec::new();
    for round in 0..20 {
        let (active, standby, cut) = if round % 2 == 0 {
            (&p.a, &p.b, &to_a)
        } else {
            (&p.b, &p.a, &to_b)
        };
        cut.cut();
        let promoted = wait_role(standby, "active").await;
        epochs.push(promoted["ha"]["epoch"].as_u64().unwrap());
        // The cut-off instance stopped by itself, on its lease: it cannot
        // confirm the lock, so it is suspended (it still answers its
        // peer's probes, saying so, which lets the peer take over at once).
        let demoted = eventually(DEADLINE, "the cut-off instance to stop serving", || async {
            let s: Value = serde_json::from_str(&halo_testkit::http::get(active.admin, "/status").await?.1).ok()?;
            (role(&s) == "suspended" || role(&s) == "standby").then_some(s)
        })
        .await;
        let ended = demoted["ha"]["terms"].as_array().unwrap().last().unwrap()["ended_by"].clone();
        assert!(
            ended == "lease_expired" || ended == "lock_lost" || ended == "session_lost",
            "round {round}: ended by {ended}"
        );
        cut.restore();
        // Back as a standby with a fresh session before the next round.
        eventually(DEADLINE, "the cut-off instance to contend again", || async {
            let s = halo_testkit::http::get(active.admin, "/status").await?;
            let s: Value = serde_json::from_str(&s.1).ok()?;
            (role(&s) == "standby" && s["ha"]["session"].is_string() && s["ha"]["consul_error"].is_null()).then_some(())
        })
        .await;
    }
    let (sa, sb) = (p.a.status().await, p.b.status().await);
    assert_never_both_active(&sa, &sb);
    // How far apart the instances' own timestamps kept each handover.
    let mut all: Vec<(u64, u64)> = terms(&sa).iter().chain(terms(&sb).iter()).map(|t| (t.1, t.2)).collect();
    all.sort_unstable();
    let gaps: Vec<u64> = all.windows(2).map(|w| w[1].0 - w[0].1).collect();
    eprintln!(
        "cut-off handovers: smallest gap {} ms, largest {} ms",
        gaps.iter().min().unwrap() / 1000,
        gaps.iter().max().unwrap() / 1000
    );
    assert!(epochs.windows(2).all(|w| w[0] < w[1]), "epochs rise: {epochs:?}");
    // One term per round plus the first; more only if an active suspended
    // and resumed on a slow answer, which is allowed (same epoch).
    assert!(
        terms(&sa).len() + terms(&sb).len() >= 21,
        "one term per round plus the first"
    );
}

#[tokio::test]
async fn losing_the_consul_leader_never_makes_two_actives_nor_empties_a_table() {
    let mut cluster = halo_testkit::ConsulCluster::start(3).await;
    let agent = cluster.add_client().await;
    let client = halo_consul::Client::from_address(agent.http_url()).unwrap();
    let backends = [
        TestBackend::start("one", Behavior::GreetEcho).await,
        TestBackend::start("two", Behavior::GreetEcho).await,
    ];
    for (i, b) in backends.iter().enumerate() {
        client
            .register_service(&halo_consul::ServiceRegistration {
                id: format!("web-{i}"),
                name: "web".into(),
                address: Some("127.0.0.1".into()),
                port: Some(b.addr.port()),
                checks: vec![halo_consul::CheckRegistration::ttl(
                    format!("web-{i}:ttl"),
                    "ttl",
                    Duration::from_secs(600),
                    halo_consul::CheckStatus::Passing,
                )],
                ..halo_consul::ServiceRegistration::default()
            })
            .await
            .unwrap();
    }
    let config = |id: &str, admin: SocketAddr, vip: SocketAddr| {
        format!(
            "[admin]\nlisten = \"{admin}\"\n[consul]\naddress = \"{}\"\nwait = \"5s\"\n[ha]\ncluster = \"quorum\"\nid = \"{id}\"\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nservice = \"web\"\n",
            agent.http_url()
        )
    };
    let (admin_a, vip) = addrs();
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let a = start(&config("a", admin_a, vip), admin_a).await;
    wait_role(&a, "active").await;
    let b = start(&config("b", admin_b, vip), admin_b).await;
    wait_role(&b, "standby").await;
    for lb in [&a, &b] {
        eventually(DEADLINE, "both backends in the table", || async {
            (lb.status().await["vips"][0]["backends"].as_array()?.len() == 2).then_some(())
        })
        .await;
    }
    let epoch = a.status().await["ha"]["epoch"].as_u64().unwrap();

    // Watch both instances and the VIP through the whole outage.
    let prober = Prober::start(vip);
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let monitor = {
        let (admins, watching) = ([a.admin, b.admin], std::sync::Arc::clone(&watching));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                for admin in admins {
                    if let Some((200, body)) = halo_testkit::http::get(admin, "/status").await {
                        let s: Value = serde_json::from_str(&body).unwrap();
                        let tables = s["vips"][0]["backends"].as_array().map_or(0, Vec::len);
                        seen.push((admin, role(&s).to_owned(), s["ha"]["epoch"].as_u64(), tables));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };

    let old = cluster.leader().await.expect("a leader");
    let stopped = std::time::Instant::now();
    cluster.stop(old);
    eventually(DEADLINE, "a new Consul leader", || async {
        cluster.leader().await.filter(|l| *l != old)
    })
    .await;
    let elected = std::time::Instant::now();
    // Past the election: both instances reach Consul through it again.
    for lb in [&a, &b] {
        eventually(DEADLINE, "the instance to reach Consul again", || async {
            let s = lb.status().await;
            (s["ha"]["consul_error"].is_null() && s["vips"][0]["discovery"]["up"] == true).then_some(())
        })
        .await;
    }
    served_after(&prober.log, elected).await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = monitor.await.unwrap();
    let log = prober.stop().await;

    // Without a leader no read of the lock can be confirmed: the active
    // suspends (serving nothing) rather than risk two actives, and serves
    // again once a confirming read succeeds; a standby may instead take
    // over, but never while the other serves.
    assert!(seen.len() > 10, "the monitor saw the outage");
    for (admin, _, _, tables) in &seen {
        assert_eq!(*tables, 2, "{admin}'s table lost backends");
    }
    let (sa, sb) = eventually(DEADLINE, "one instance to serve again", || async {
        let (sa, sb) = (a.status().await, b.status().await);
        (role(&sa) == "active" || role(&sb) == "active").then_some((sa, sb))
    })
    .await;
    assert_never_both_active(&sa, &sb);
    // a resumed (same epoch), or one of them won the lock anew after a
    // forced takeover (a later epoch): never an older one.
    let active = if role(&sa) == "active" { &sa } else { &sb };
    assert!(active["ha"]["epoch"].as_u64() >= Some(epoch), "{}", active["ha"]);
    // Served again soon after Consul had a leader (the goal is 1 s; the
    // bound is generous).
    let back = log
        .iter()
        .find(|(at, ok)| *ok && *at > elected)
        .map(|(at, _)| at.duration_since(elected))
        .expect("served after the election");
    let outage = log
        .iter()
        .filter(|(at, ok)| !ok && *at > stopped)
        .map(|(at, _)| *at)
        .max()
        .map(|last| last.duration_since(stopped));
    eprintln!(
        "consul leader loss: new leader {:?} after the stop; vip served {back:?} after that; failures until {outage:?} after the stop",
        elected.duration_since(stopped)
    );
    assert!(
        back < Duration::from_secs(5),
        "served again {back:?} after the new leader"
    );
}
