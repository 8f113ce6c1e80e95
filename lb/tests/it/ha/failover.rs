//! Failover and handover on one host: kill -9 of the active within the TTL
//! plus the lock delay, a frozen active that serves nothing when it wakes,
//! SIGTERM on the active (a handover within 100 ms) and on the standby, and
//! a UDP VIP failing over with the pair.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use halo_testkit::{eventually, ConsulAgent};
use serde_json::Value;

use super::{assert_never_both_active, pair, role, start, terms, wait_role, CHECK_TTL, LOCK_DELAY};
use crate::support::*;

#[tokio::test]
async fn kill_9_of_the_active_fails_over_within_ttl_plus_lock_delay() {
    let consul = ConsulAgent::start().await;
    let p = pair("kill", &consul.http_url(), &consul.http_url()).await;
    let epoch = p.a.status().await["ha"]["epoch"].as_u64().unwrap();
    let prober = Prober::start(p.vip);
    served_after(&prober.log, Instant::now()).await;

    let killed = Instant::now();
    p.a.signal(nix::sys::signal::Signal::SIGKILL);
    let status = wait_role(&p.b, "active").await;
    served_after(&prober.log, killed).await;
    let log = prober.stop().await;

    assert!(status["ha"]["epoch"].as_u64().unwrap() > epoch, "a new epoch");
    let first_ok = log
        .iter()
        .find(|(at, ok)| *at > killed && *ok)
        .map(|(at, _)| *at)
        .unwrap();
    let gap = first_ok - killed;
    eprintln!("kill -9 failover: served again {gap:?} after the kill");
    assert!(
        gap <= CHECK_TTL + LOCK_DELAY + Duration::from_millis(500),
        "failover took {gap:?}"
    );
    // Failures only inside the window, none once the standby serves.
    let late: Vec<_> = log.iter().filter(|(at, ok)| *at >= first_ok && !ok).collect();
    assert!(
        late.is_empty(),
        "{} failures after the standby took over; b's terms: {}",
        late.len(),
        p.b.status().await["ha"]["terms"]
    );
    // Before the kill every attempt succeeded, but for the one in flight
    // when it happened (the prober makes one attempt at a time).
    let before: Vec<bool> = log.iter().filter(|(at, _)| *at < killed).map(|(_, ok)| *ok).collect();
    let settled = &before[..before.len().saturating_sub(1)];
    assert!(settled.iter().all(|ok| *ok), "failures before the kill");
}

#[tokio::test]
async fn a_frozen_active_serves_nothing_when_it_wakes_and_the_standby_never_claims_an_unbound_vip() {
    // SIGSTOP of the active for 3 s on one host: the standby's probes go
    // unanswered, it takes the lock, but cannot bind the port the frozen
    // process still holds, so it must not call itself active (it releases
    // and retries). The frozen one wakes past its lease: it serves nothing
    // (the data plane checks the lease per connection) and steps down.
    let consul = ConsulAgent::start().await;
    let p = pair("frozen", &consul.http_url(), &consul.http_url()).await;
    let prober = Prober::start(p.vip);
    served_after(&prober.log, Instant::now()).await;

    // Watch b's claims: whenever it says active, its listener must be bound.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let monitor = {
        let (admin, watching) = (p.b.admin, std::sync::Arc::clone(&watching));
        tokio::spawn(async move {
            let mut lies = Vec::new();
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some((200, body)) = halo_testkit::http::get(admin, "/status").await {
                    let s: Value = serde_json::from_str(&body).unwrap();
                    if role(&s) == "active" && s["vips"][0]["listening"] != true {
                        lies.push(s);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lies
        })
    };
    let frozen = Instant::now();
    p.a.signal(nix::sys::signal::Signal::SIGSTOP);
    // The standby takes the lock (forced takeover) while a is frozen.
    eventually(DEADLINE, "the standby to force the takeover", || async {
        let s = p.b.status().await;
        (s["ha"]["detector"]["forced_takeovers"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    tokio::time::sleep_until((frozen + Duration::from_secs(3)).into()).await;
    p.a.signal(nix::sys::signal::Signal::SIGCONT);
    let thawed = Instant::now();
    // Either may serve next: b when its back-off ends, or a, which finds the
    // lock free once it has stepped down (b released it on failing to bind).
    served_after(&prober.log, thawed).await;
    let (sa, _) = eventually(DEADLINE, "one instance to serve", || async {
        let (sa, sb) = (p.a.status().await, p.b.status().await);
        (role(&sa) == "active" || role(&sb) == "active").then_some((sa, sb))
    })
    .await;
    // The thawed a did not serve on past its lease: its frozen term ended
    // on the lease (or a loss it learned of), not by a handover.
    let first = sa["ha"]["terms"].as_array().unwrap()[0].clone();
    assert!(
        first["ended_by"] == "lease_expired" || first["ended_by"] == "lock_lost",
        "{first}"
    );
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let lies = monitor.await.unwrap();
    let log = prober.stop().await;
    assert!(
        lies.is_empty(),
        "b claimed to be active without its listener: {}",
        lies[0]
    );
    let (sa, sb) = (p.a.status().await, p.b.status().await);
    assert_never_both_active(&sa, &sb);
    let gap = log
        .iter()
        .find(|(at, ok)| *at > thawed && *ok)
        .map(|(at, _)| at.duration_since(frozen))
        .unwrap();
    eprintln!("frozen active: served again {gap:?} after the SIGSTOP (frozen for 3 s)");
}

#[tokio::test]
async fn sigterm_on_the_active_hands_over_within_100ms() {
    let consul = ConsulAgent::start().await;
    let mut p = pair("term", &consul.http_url(), &consul.http_url()).await;
    let prober = Prober::start(p.vip);
    served_after(&prober.log, Instant::now()).await;

    let sent = Instant::now();
    p.a.signal(nix::sys::signal::Signal::SIGTERM);
    let sb = wait_role(&p.b, "active").await;
    served_after(&prober.log, sent).await;
    assert!(p.a.wait_exit().await.success(), "{}", p.a.log());
    let log = prober.stop().await;

    // The handover from both sides' own clocks: a stopped serving, then b
    // started, within 100 ms.
    let a_stopped =
        p.a.log()
            .lines()
            .find(|l| l.contains("stepped down for shutdown"))
            .map(str::to_owned);
    assert!(a_stopped.is_some(), "a logged its step-down:\n{}", p.a.log());
    let b_terms = terms(&sb);
    let (_, b_from, _) = *b_terms.last().unwrap();
    let a_to = a_term_end(&p.a);
    assert!(a_to <= b_from, "b started at {b_from} before a stopped at {a_to}");
    let handover = Duration::from_micros(b_from - a_to);
    // What a client saw: the longest run of attempts without a greeting.
    let mut worst = Duration::ZERO;
    let mut last_ok: Option<Instant> = None;
    for (at, ok) in &log {
        if *ok {
            if let Some(prev) = last_ok {
                worst = worst.max(*at - prev);
            }
            last_ok = Some(*at);
        }
    }
    eprintln!("SIGTERM handover: {handover:?} between the instances' own timestamps, client gap {worst:?}");
    assert!(handover <= Duration::from_millis(100), "handover took {handover:?}");
    assert!(sent.elapsed() < DEADLINE);
}

/// The end of a's last term, from the `term ended` line it logs with its own
/// wall clock.
fn a_term_end(lb: &Lb) -> u64 {
    let log = lb.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("term ended"))
        .unwrap_or_else(|| panic!("no 'term ended' line:\n{log}"));
    line.split("to_unix_us=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no to_unix_us in {line:?}"))
}

#[tokio::test]
async fn sigterm_on_the_standby_leaves_the_active_serving() {
    let consul = ConsulAgent::start().await;
    let mut p = pair("standby-term", &consul.http_url(), &consul.http_url()).await;
    let epoch = p.a.status().await["ha"]["epoch"].as_u64().unwrap();
    // Each process registers as halo-lb-<cluster>-<id>-<instance prefix>.
    let service_id = |status: Value, id: &str| {
        format!(
            "halo-lb-standby-term-{id}-{}",
            &status["ha"]["instance"].as_str().unwrap()[..8]
        )
    };
    let (service_a, service_b) = (service_id(p.a.status().await, "a"), service_id(p.b.status().await, "b"));
    p.b.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(p.b.wait_exit().await.success(), "{}", p.b.log());
    let sa = p.a.status().await;
    assert_eq!(role(&sa), "active");
    assert_eq!(sa["ha"]["epoch"].as_u64(), Some(epoch), "no new election");
    assert!(greeting(p.vip).await.is_ok());
    // The standby took its registration with it.
    let client = halo_consul::Client::from_address(consul.http_url()).unwrap();
    assert!(client.agent_service(&service_b).await.unwrap().is_none());
    assert!(client.agent_service(&service_a).await.unwrap().is_some());
}

/// A UDP VIP fails over with the pair: served by the active only (the
/// standby never binds it: the port is exclusive), by the new active after
/// a kill -9, and handed over on SIGTERM, with no overlap of terms.
#[tokio::test]
async fn a_udp_vip_fails_over_with_the_pair() {
    use std::net::{Ipv4Addr, UdpSocket};

    let consul = ConsulAgent::start().await;
    // A UDP echo backend.
    let backend = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = backend.recv_from(&mut buf) {
            let _ = backend.send_to(&buf[..n], from);
        }
    });
    let vip = SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        halo_testkit::dnsd::free_udp_port(Ipv4Addr::LOCALHOST),
    ));
    let config = |id: &str, admin: SocketAddr| {
        format!(
            "[admin]\nlisten = \"{admin}\"\n[[vip]]\nname = \"dns\"\nlisten = \"{vip}\"\nprotocol = \"udp\"\nalgorithm = \"maglev\"\nbackends = [\"{backend_addr}\"]\n[consul]\naddress = \"{}\"\n[ha]\ncluster = \"udp\"\nid = \"{id}\"\n",
            consul.http_url()
        )
    };
    let admin_a = SocketAddr::from(([127, 0, 0, 1], port()));
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let a = start(&config("a", admin_a), admin_a).await;
    wait_role(&a, "active").await;
    let b = start(&config("b", admin_b), admin_b).await;
    wait_role(&b, "standby").await;

    // Who answers: the instance whose datagram counter moves.
    let ask = || async move {
        tokio::task::spawn_blocking(move || {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = [0u8; 16];
            s.send_to(b"hello", vip).is_ok() && s.recv_from(&mut buf).is_ok_and(|(n, _)| &buf[..n] == b"hello")
        })
        .await
        .unwrap()
    };
    let served = |lb: &Lb| {
        let admin = lb.admin;
        async move {
            let (_, body) = halo_testkit::http::get(admin, "/status").await?;
            let status: Value = serde_json::from_str(&body).ok()?;
            status["vips"][0]["udp"]["datagrams_out"].as_u64()
        }
    };
    eventually(DEADLINE, "the active to answer on the UDP VIP", || async {
        ask().await.then_some(())
    })
    .await;
    assert!(served(&a).await.unwrap_or(0) >= 1, "a answered");
    assert_eq!(served(&b).await.unwrap_or(0), 0, "the standby forwards nothing");
    assert!(UdpSocket::bind(vip).is_err(), "the active holds the port");

    // kill -9 of the active: b takes the UDP VIP.
    a.signal(nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    wait_role(&b, "active").await;
    eventually(DEADLINE, "the new active to answer on the UDP VIP", || async {
        ask().await.then_some(())
    })
    .await;
    eprintln!("UDP VIP answered again {:?} after kill -9", killed.elapsed());
    assert!(served(&b).await.unwrap_or(0) >= 1, "b answers now");

    // A third instance joins as standby; SIGTERM on b hands over to it.
    let admin_c = SocketAddr::from(([127, 0, 0, 1], port()));
    let mut c = start(&config("c", admin_c), admin_c).await;
    wait_role(&c, "standby").await;
    let mut b = b;
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let sc = wait_role(&c, "active").await;
    assert!(b.wait_exit().await.success(), "{}", b.log());
    eventually(DEADLINE, "the third instance to answer on the UDP VIP", || async {
        ask().await.then_some(())
    })
    .await;
    assert!(served(&c).await.unwrap_or(0) >= 1, "c answers now");
    let b_to = a_term_end(&b);
    let (_, c_from, _) = *terms(&sc).last().unwrap();
    assert!(b_to <= c_from, "c started at {c_from} before b stopped at {b_to}");
    c.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.wait_exit().await.success());
}
