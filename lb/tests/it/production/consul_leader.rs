//! The Consul leader killed, at `raft_multiplier = 1` and at Consul's
//! default raft timing: never two actives, no table emptied, the VIP served
//! again soon after Consul has a leader.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halo_testkit::dc::DcSpec;
use halo_testkit::eventually;

use super::observe::{gap, VipSampler};
use super::rig::Rig;
use super::{ms, spec, WAIT};

/// The Consul leader killed (raft_multiplier 1: a new leader in about a
/// second; the benchmark measures Consul's default timing): never two
/// actives, neither instance's table emptied, and the VIP served again
/// soon after Consul has a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consul_leader_killed() {
    if !halo_testkit::netns::required("production::consul_leader::the_consul_leader_killed") {
        return;
    }
    leader_killed(spec(2, 1), "raft_multiplier 1").await;
}

/// The same at Consul's default raft timing (`raft_multiplier = 5`): the
/// election itself takes 10-20 s here, and no read of the lock can be
/// confirmed meanwhile, so the VIP is unserved for about that long (the
/// price of never having two actives); it is served again soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consul_leader_killed_at_consuls_default_raft_timing() {
    if !halo_testkit::netns::required(
        "production::consul_leader::the_consul_leader_killed_at_consuls_default_raft_timing",
    ) {
        return;
    }
    let spec = DcSpec {
        raft_multiplier: None,
        ..spec(2, 1)
    };
    leader_killed(spec, "raft_multiplier default (5)").await;
}

async fn leader_killed(spec: DcSpec, timing: &str) {
    let rig = Rig::start(spec).await;
    let sampler = VipSampler::start(&rig.dc);
    let prober = rig.prober();
    let before = rig.active().await;
    let epoch = rig.status(before).await.unwrap()["ha"]["epoch"].as_u64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    let old = rig.dc.kill_leader().await;
    let watching = Arc::new(AtomicBool::new(true));
    let tables: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
    // What each balancer's discovery and Consul itself said the first time
    // a table came up short: for the failure message's reader.
    let short: Arc<Mutex<Option<String>>> = Arc::default();
    let monitor = async {
        while watching.load(Ordering::Relaxed) {
            for i in 1..=2 {
                if let Some(s) = rig.status(i).await {
                    let n = s["vips"][0]["backends"].as_array().map_or(0, Vec::len);
                    tables.lock().unwrap().push((i, n));
                    if n != 1 && short.lock().unwrap().is_none() {
                        let health = rig.dc.get_json("client", "/v1/health/service/web").await;
                        *short.lock().unwrap() = Some(format!(
                            "lb{i} discovery: {}; Consul's /v1/health/service/web: {health:?}",
                            s["vips"][0]["discovery"]
                        ));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let elect = async {
        let leader = eventually(WAIT * 3, "a new Consul leader", || async {
            let l = rig.dc.leader().await?;
            (l != old).then_some(l)
        })
        .await;
        let elected = Instant::now();
        rig.served_after(elected).await;
        // Watch a while longer.
        tokio::time::sleep(Duration::from_secs(2)).await;
        watching.store(false, Ordering::Relaxed);
        (leader, elected)
    };
    let ((leader, elected), ()) = tokio::join!(elect, monitor);
    let after = rig.active().await;
    let epoch_after = rig.status(after).await.unwrap()["ha"]["epoch"].as_u64();
    let probes = prober.stop();
    let samples = sampler.stop();
    let g = gap(&probes, killed, Instant::now()).expect("served after the election");
    let back = probes
        .iter()
        .find(|p| p.ok && p.at >= elected)
        .map(|p| p.at - elected)
        .unwrap();
    let tables = tables.lock().unwrap().clone();
    eprintln!(
        "FIGURE Consul leader {old} killed ({timing}): {leader} leader {} after the kill; client gap {}; served again {} after the new leader; \
         lb{before} active (epoch {epoch:?}) before, lb{after} (epoch {epoch_after:?}) after; {} table samples",
        ms(elected - killed),
        ms(g),
        ms(back),
        tables.len()
    );
    assert!(tables.len() > 5, "the monitor saw the election");
    if let Some(said) = short.lock().unwrap().as_ref() {
        eprintln!("a table came up short; {said}");
    }
    assert!(
        tables.iter().all(|(_, n)| *n == 1),
        "a table lost its backend: {tables:?}"
    );
    rig.check("Consul leader killed", &samples, &[]).await;
    assert!(back <= Duration::from_secs(3), "served {back:?} after the new leader");
}
