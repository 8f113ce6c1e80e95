//! A backend host powered off under load: only the requests in flight to it
//! fail, and the latencies the clients saw meanwhile.

use std::time::{Duration, Instant};

use halo_testkit::eventually;

use super::observe::{Probe, Prober, VipSampler};
use super::rig::Rig;
use super::{ms, spec, WAIT};

/// A backend host powered off under load (four client threads, one request
/// at a time each): no request fails but those in flight to it when it went
/// off; prints the latencies the clients saw during the event.
/// raft_multiplier 1, Consul's default gossip (the dead node's serfHealth
/// fails after a few seconds; halo-lb's passive check ejects it before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_host_powered_off_under_load() {
    if !halo_testkit::netns::required("production::backend::a_backend_host_powered_off_under_load") {
        return;
    }
    let rig = Rig::start(spec(2, 2)).await;
    let sampler = VipSampler::start(&rig.dc);
    let prober = Prober::start(
        rig.dc.client().netns(),
        rig.vip(),
        4,
        Duration::from_secs(2),
        Duration::from_secs(5),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let off = Instant::now();
    rig.dc.power_off("backend1");
    // Powering off takes a few milliseconds (every process SIGKILLed, then
    // the link down): requests started until it returned may have reached
    // the dying host.
    let off_end = Instant::now();
    let a = rig.active().await;
    eventually(WAIT, "backend1 to leave the active's table", || async {
        let s = rig.status(a).await?;
        (s["vips"][0]["backends"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let left = off.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let probes = prober.stop();
    let samples = sampler.stop();
    // In flight: started before the power-off and not finished by then.
    let in_flight = probes.iter().filter(|p| p.at < off_end && p.at + p.took > off).count();
    let failed_in_flight = probes
        .iter()
        .filter(|p| !p.ok && p.at < off_end && p.at + p.took > off)
        .count();
    let failed_after: Vec<&Probe> = probes.iter().filter(|p| !p.ok && p.at >= off_end).collect();
    let stats = |sel: &dyn Fn(&Probe) -> bool, f: &dyn Fn(&Probe) -> Option<Duration>| {
        let mut v: Vec<Duration> = probes.iter().filter(|p| sel(p)).filter_map(f).collect();
        v.sort();
        let pick = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or_default()
        };
        format!(
            "n {} p50 {} p99 {} max {}",
            v.len(),
            ms(pick(0.5)),
            ms(pick(0.99)),
            ms(pick(1.0))
        )
    };
    let during = |p: &Probe| p.at >= off && p.at < off + left;
    let baseline = |p: &Probe| p.at < off;
    eprintln!(
        "FIGURE backend host power-off under load: power-off took {}; backend1 left the active's table {} after; {} requests, \
         {failed_in_flight} of {in_flight} in flight (started before the power-off returned) failed, {} failed after; connect latency before: {}; during: {}; \
         whole request before: {}; during: {}",
        ms(off_end - off),
        ms(left),
        probes.len(),
        failed_after.len(),
        stats(&baseline, &|p| p.connect),
        stats(&during, &|p| p.connect),
        stats(&baseline, &|p| Some(p.took)),
        stats(&during, &|p| Some(p.took)),
    );
    let described: Vec<String> = failed_after
        .iter()
        .map(|p| {
            format!(
                "started {} after the power-off returned, connected in {:?}, failed after {}",
                ms(p.at - off_end),
                p.connect,
                ms(p.took)
            )
        })
        .collect();
    assert!(
        failed_after.is_empty(),
        "requests failed after the power-off: {described:#?}"
    );
    rig.check("backend power-off", &samples, &[]).await;
}
