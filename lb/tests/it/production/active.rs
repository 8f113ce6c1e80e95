//! Faults of the active's process or host: kill -9 of halo-lb, power-off of
//! its host, SIGSTOP for 3 s; and kill -9 with three instances.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use halo_testkit::eventually;

use super::observe::{Excuse, VipSampler};
use super::rig::Rig;
use super::{finish_rounds, ms, other, role, spec, FAILOVER_BOUND, KILL_BOUND, POWER_OFF_BOUND, WAIT};

/// kill -9 of the active halo-lb, its host and agent alive: the standby's
/// probe is refused and it takes over; the killed process's address stays
/// on its host (excused) until halo-lb is started there again. Three
/// rounds, alternating hosts. raft_multiplier 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_active() {
    if !halo_testkit::netns::required("production::active::kill_9_of_the_active") {
        return;
    }
    let mut rig = Rig::start(spec(2, 1)).await;
    let sampler = VipSampler::start(&rig.dc);
    let prober = rig.prober();
    let mut events = Vec::new();
    let mut excuses = Vec::new();
    for round in 0..3 {
        let a = rig.active().await;
        let s = other(a);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = rig.kill(a).await;
        rig.wait_role(s, "active").await;
        rig.served_after(killed).await;
        events.push((round, killed));
        rig.launch(a);
        rig.wait_role(a, "standby").await;
        assert!(
            !rig.holds_vip(a),
            "the restarted standby removed the address it died with"
        );
        excuses.push(Excuse {
            lb: a,
            from: killed,
            until: Instant::now(),
        });
        rig.wait_table(a).await;
    }
    finish_rounds(&rig, prober, sampler, &events, &excuses, "kill -9", KILL_BOUND).await;
}

/// Power-off of the active's host (halo-lb and the agent die, the link goes
/// down): the standby's probes go unanswered. Three rounds; the host is
/// powered on and halo-lb started again between rounds. raft_multiplier 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_off_of_the_active_host() {
    if !halo_testkit::netns::required("production::active::power_off_of_the_active_host") {
        return;
    }
    let mut rig = Rig::start(spec(2, 1)).await;
    let sampler = VipSampler::start(&rig.dc);
    let prober = rig.prober();
    let mut events = Vec::new();
    let mut excuses = Vec::new();
    for round in 0..3 {
        let a = rig.active().await;
        let s = other(a);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let off = rig.power_off(a).await;
        rig.wait_role(s, "active").await;
        rig.served_after(off).await;
        events.push((round, off));
        rig.dc.power_on(&format!("lb{a}")).await;
        excuses.push(Excuse {
            lb: a,
            from: off,
            until: Instant::now(),
        });
        assert!(!rig.holds_vip(a), "a powered-on host has only its own address");
        rig.launch(a);
        rig.wait_role(a, "standby").await;
        rig.wait_table(a).await;
    }
    finish_rounds(&rig, prober, sampler, &events, &excuses, "power-off", POWER_OFF_BOUND).await;
}

/// The active frozen (SIGSTOP) for 3 s, then thawed: the standby takes
/// over; the woken process serves nothing past its lease (a request the
/// client sent into its backlog while it was frozen is closed unanswered)
/// and removes the VIP. Its host is excused from the VIP check from the
/// freeze until it removed the address (a frozen process cannot). Two
/// rounds; the woken instance is restarted between them. raft_multiplier 1.
///
/// (This once found a bug: the woken instance's term was recorded as ending
/// when it woke, overlapping the new active's by about 2.3 s although its
/// data plane served nothing past the lease. Terms now end at the lease.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_the_active_for_3s() {
    if !halo_testkit::netns::required("production::active::sigstop_of_the_active_for_3s") {
        return;
    }
    let mut rig = Rig::start(spec(2, 1)).await;
    let sampler = VipSampler::start(&rig.dc);
    let prober = rig.prober();
    let mut events = Vec::new();
    let mut excuses = Vec::new();
    for round in 0..2 {
        let a = rig.active().await;
        let s = other(a);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let refusals_before = lease_refusals(&rig.metrics(a).await);
        let frozen = Instant::now();
        rig.lbs[a - 1].as_mut().unwrap().process.pause();
        // Every thread of it stopped before the client connects.
        let pid = rig.lb(a).process.pid();
        eventually(
            WAIT,
            "every thread of the frozen process to be stopped",
            || async move { all_stopped(pid).then_some(()) },
        )
        .await;
        // A request into the frozen process's backlog: the kernel completes
        // the handshake (the client's neighbour entry still points at it).
        let vip = rig.vip();
        let queued = rig
            .dc
            .client()
            .within(move || {
                let mut stream = std::net::TcpStream::connect_timeout(&vip, Duration::from_millis(200))?;
                stream.write_all(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")?;
                Ok(stream)
            })
            .ok();
        rig.wait_role(s, "active").await;
        rig.served_after(frozen).await;
        events.push((round, frozen));
        tokio::time::sleep(Duration::from_secs(3).saturating_sub(frozen.elapsed())).await;
        let thawed = Instant::now();
        rig.lbs[a - 1].as_mut().unwrap().process.resume();
        eventually(WAIT, "the woken instance to remove the VIP", || async {
            (!rig.holds_vip(a)).then_some(())
        })
        .await;
        let removed = thawed.elapsed();
        excuses.push(Excuse {
            lb: a,
            from: frozen,
            until: Instant::now(),
        });
        let woken = rig.wait_role(a, "standby").await;
        let answer = queued.map(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let read = (&mut stream).take(64 * 1024).read_to_end(&mut got);
            (read.map_err(|e| e.kind()), String::from_utf8_lossy(&got).into_owned())
        });
        let refusals = lease_refusals(&rig.metrics(a).await) - refusals_before;
        eprintln!(
            "FIGURE SIGSTOP round {round}: lb{a} removed the VIP {} after SIGCONT; its last term ended by {}; \
             {refusals} connection(s) refused past the lease; the request queued while frozen got {:?}",
            ms(removed),
            woken["ha"]["terms"].as_array().unwrap().last().unwrap()["ended_by"],
            answer
                .as_ref()
                .map(|(r, body)| (r, body.lines().next().unwrap_or("").to_owned()))
        );
        if let Some((_, body)) = &answer {
            assert!(!body.contains("200"), "the woken process served past its lease: {body}");
        }
        assert!(
            removed <= Duration::from_secs(2),
            "removed the VIP {removed:?} after waking"
        );
        // No restart between rounds: a process frozen past its lease
        // deserved the takeover and is not damped.
    }
    finish_rounds(&rig, prober, sampler, &events, &excuses, "SIGSTOP", FAILOVER_BOUND).await;
}

fn lease_refusals(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("halo_vip_lease_refusals_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Three instances: one active, two standbys; kill -9 of the active makes
/// exactly one of the others active while the third stays standby; twice
/// (the killed one restarted as a standby in between). raft_multiplier 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances() {
    if !halo_testkit::netns::required("production::active::three_instances") {
        return;
    }
    let mut rig = Rig::start(spec(3, 1)).await;
    let sampler = VipSampler::start(&rig.dc);
    let prober = rig.prober();
    let mut events = Vec::new();
    let mut excuses = Vec::new();
    for round in 0..2 {
        let a = rig.active().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = rig.kill(a).await;
        let now = rig.active().await;
        assert_ne!(now, a);
        rig.served_after(killed).await;
        events.push((round, killed));
        // The third stays a standby, the new active stays active.
        let third = (1..=3).find(|i| *i != a && *i != now).unwrap();
        for _ in 0..10 {
            assert_eq!(role(&rig.status(now).await.unwrap()), "active");
            assert_eq!(role(&rig.status(third).await.unwrap()), "standby");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("FIGURE three instances round {round}: lb{a} killed, lb{now} active, lb{third} standby");
        rig.launch(a);
        rig.wait_role(a, "standby").await;
        excuses.push(Excuse {
            lb: a,
            from: killed,
            until: Instant::now(),
        });
        rig.wait_table(a).await;
    }
    finish_rounds(&rig, prober, sampler, &events, &excuses, "three instances", KILL_BOUND).await;
}

/// Whether every thread of `pid` is in state `T` (stopped).
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
            .unwrap_or(false)
    })
}
