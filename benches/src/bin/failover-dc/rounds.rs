//! The rounds against one system: its pair and the client started, then
//! for each event, round after round from a settled pair, the fault
//! injected, the gap measured, and the old active restored as the standby.
//! [`Row`] is what one round measured.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use halo_testkit::dc::Datacenter;
use halo_testkit::netns::HostProcess;

use crate::pair::Pair;
use crate::probe::ProbeLog;
use crate::sampler::{idx, Sampler};
use crate::settings::{Event, Settings, System};
use crate::{log, mono_ns, other, started, Res, BACKEND_PORTS, BALANCERS, PROBE_DEADLINE, READY, SETTLED, VIP_PORT};

/// What one round measured.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) from: String,
    pub(crate) gap_ms: f64,
    pub(crate) failed: usize,
    pub(crate) samples: usize,
    pub(crate) two_holders: usize,
    /// Cable: ms from the pull until the cut-off host no longer held the
    /// VIP (None: it kept it until re-plugged).
    pub(crate) old_dropped_ms: Option<f64>,
    /// ms from the event until the new active's host held the VIP.
    pub(crate) new_claimed_ms: Option<f64>,
    /// The pair had handed over on its own (no fault injected) since the
    /// round before.
    pub(crate) unprovoked_before: bool,
    pub(crate) note: String,
}

/// A round starts from a settled pair only: the client is answered
/// steadily, by the same balancer for [`SETTLED`], and that balancer is
/// the active while the other is a ready standby. Without this a fault
/// can land in the middle of a handover nobody injected (a Consul-side
/// flap, say) and be charged the sum of both; those handovers are counted
/// and reported separately instead. Returns the active.
async fn wait_settled(pair: &mut Pair<'_>, sampler: &Sampler, pl: &mut ProbeLog) -> Res<&'static str> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        wait_steady(pl).await?;
        let who = pl.last_who().ok_or("no answer yet")?;
        let active: &'static str = BALANCERS
            .iter()
            .find(|h| **h == who)
            .ok_or_else(|| format!("an answer from {who:?}, not a balancer"))?;
        let quiet = pl
            .answering_since()
            .is_some_and(|t| mono_ns() - t >= SETTLED.as_nanos() as i64);
        if quiet && pair.is_active(active, sampler).await && pair.is_standby(other(active)).await {
            return Ok(active);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the pair did not settle within 60 s ({active} answering, quiet {quiet})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_steady(pl: &mut ProbeLog) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pl.steady() {
        if Instant::now() > deadline {
            return Err("no steady answers within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub(crate) fn over_budget(s: &Settings) -> bool {
    started().elapsed() > Duration::from_secs(s.max_seconds)
}

/// One system: start the pair and a client, run the rounds of each event.
pub(crate) async fn bench_system(
    dc: &Datacenter,
    s: &Settings,
    system: System,
    sampler: &Sampler,
    results: &mut BTreeMap<(System, Event), Vec<Row>>,
    notes: &mut Vec<String>,
) -> Res<()> {
    let mut pair = Pair {
        dc,
        s,
        system,
        dir: s.out.clone(),
        procs: BTreeMap::new(),
        log_at: BTreeMap::new(),
    };
    let mut extra: Vec<HostProcess> = Vec::new();
    let res = run_system(&mut pair, &mut extra, sampler, results, notes).await;
    pair.stop_all();
    for mut p in extra {
        p.kill();
    }
    res
}

/// Waits until `host`'s node passes `serfHealth` again (a node failed in
/// gossip comes back on serf's reconnect, up to 30 s).
async fn wait_serf_passing(dc: &Datacenter, host: &str) -> Res<()> {
    let started = Instant::now();
    while dc.serf_health("client", host).await.as_deref() != Some("passing") {
        if started.elapsed() > READY {
            return Err(format!("{host}'s serfHealth is not passing after {READY:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn run_system(
    pair: &mut Pair<'_>,
    extra: &mut Vec<HostProcess>,
    sampler: &Sampler,
    results: &mut BTreeMap<(System, Event), Vec<Row>>,
    notes: &mut Vec<String>,
) -> Res<()> {
    let (dc, s, system) = (pair.dc, pair.s, pair.system);
    // The previous system's last round may have left a balancer's node
    // failed in gossip (a cable pulled and re-plugged: serf's reconnect
    // can take 30 s); a session bound to it cannot be created until it
    // passes again, which is not what this system is measured on.
    for host in BALANCERS {
        wait_serf_passing(dc, host).await?;
    }
    pair.write_configs()?;
    if system == System::Halo {
        let b = dc.backend(1);
        for (i, port) in BACKEND_PORTS.iter().enumerate() {
            let mut cmd = b.command(&s.python);
            cmd.arg(&s.failover_py).args([
                "serve",
                "--host",
                &b.ip().to_string(),
                "--port",
                &port.to_string(),
                "--name",
                BALANCERS[i],
            ]);
            extra.push(b.spawn_logged(cmd, &s.out.join(format!("backend-{}.log", BALANCERS[i]))));
        }
    }
    pair.start("lb1");
    pair.wait("the first active", "lb1", false, sampler).await?;
    pair.start("lb2");
    pair.wait("the standby", "lb2", true, sampler).await?;

    let probe_path = s.out.join(format!("probe-{}.log", system.key()));
    let mut probe = dc.client().command(&s.python);
    probe.arg(&s.failover_py).args([
        "probe",
        "--host",
        &dc.vip().to_string(),
        "--port",
        &VIP_PORT.to_string(),
        "--out",
        &probe_path.to_string_lossy(),
    ]);
    extra.push(
        dc.client()
            .spawn_logged(probe, &s.out.join(format!("probe-{}.stderr", system.key()))),
    );
    let mut pl = ProbeLog::new(probe_path);
    wait_steady(&mut pl).await?;

    let mut status_log = String::new();
    for &event in &s.events {
        let rounds = match system {
            System::ConsulLock => s.consul_rounds,
            System::Keepalived => s.keepalived_rounds,
            System::Halo => s.rounds,
        };
        let mut rows = Vec::new();
        let mut expected: Option<&'static str> = None;
        for n in 0..rounds {
            if over_budget(s) {
                notes.push(format!(
                    "time budget ({} s) used up: {} {} ran {} of {rounds} rounds",
                    s.max_seconds,
                    system.key(),
                    event.key(),
                    rows.len()
                ));
                break;
            }
            let active = wait_settled(pair, sampler, &mut pl).await?;
            // The last round left `expected` serving; if another serves
            // now, something other than the harness moved the VIP since.
            let unprovoked = expected.is_some_and(|e| e != active);
            if unprovoked {
                log(&format!(
                    "{} {}: a handover with no fault injected before round {} ({} serves, not {}); see the balancers' logs",
                    system.key(),
                    event.key(),
                    n + 1,
                    active,
                    expected.unwrap_or_default()
                ));
            }
            let standby = other(active);
            let row = round(pair, sampler, &mut pl, event, active, standby).await;
            let row = match row {
                Ok(r) => Row {
                    unprovoked_before: unprovoked,
                    ..r
                },
                Err(e) => {
                    results.insert((system, event), rows);
                    return Err(format!("{} {} round {}: {e}", system.key(), event.key(), n + 1));
                }
            };
            log(&format!(
                "{} {} round {}: {active} -> {standby}: gap {:.1} ms, {} failed, two holders in {} of {} samples{}",
                system.key(),
                event.key(),
                n + 1,
                row.gap_ms,
                row.failed,
                row.two_holders,
                row.samples,
                if row.note.is_empty() {
                    String::new()
                } else {
                    format!("; {}", row.note)
                }
            ));
            if system == System::Halo {
                for h in BALANCERS {
                    let st = pair.halo_status(h).await.unwrap_or(serde_json::Value::Null);
                    let _infallible = writeln!(
                        status_log,
                        "{{\"event\":\"{}\",\"round\":{},\"host\":\"{h}\",\"ha\":{st}}}",
                        event.key(),
                        n + 1
                    );
                }
            }
            rows.push(row);
            expected = Some(standby);
        }
        results.insert((system, event), rows);
    }
    if !status_log.is_empty() {
        std::fs::write(s.out.join("halo-status.jsonl"), status_log).map_err(|e| format!("write status: {e}"))?;
    }
    Ok(())
}

pub(crate) async fn round(
    pair: &mut Pair<'_>,
    sampler: &Sampler,
    pl: &mut ProbeLog,
    event: Event,
    active: &'static str,
    standby: &'static str,
) -> Res<Row> {
    let dc = pair.dc;
    let s = pair.s;
    let timeout = if pair.system == System::ConsulLock {
        Duration::from_secs(180)
    } else {
        Duration::from_secs(60)
    };
    let mut note = String::new();
    let t_event = mono_ns();
    match event {
        Event::Kill => pair.kill(active),
        Event::PowerOff => {
            sampler.set_powered(active, false);
            dc.power_off(active);
        }
        Event::Cable => dc.unplug(active),
    }
    let gap = pl.gap(t_event, standby, timeout).await;
    let (gap_ms, t_answer) = match gap {
        Ok(g) => g,
        Err(e) => {
            // Undo the fault before giving up, so the clean-up is orderly.
            if event == Event::Cable {
                dc.plug(active);
            }
            return Err(e);
        }
    };
    let mut old_dropped_ms = None;
    if event != Event::Kill {
        // The host stays off / the cable out for FAILOVER_FAULT_SECONDS (at
        // least 2 s after the standby answered), long enough for Consul to
        // declare the node failed: does a cut-off active drop the VIP on
        // its own?
        let until = (t_event + (s.fault_seconds as i64) * 1_000_000_000).max(t_answer + 2_000_000_000);
        let wait = (until - mono_ns()).max(0);
        tokio::time::sleep(Duration::from_nanos(wait as u64)).await;
    }
    if event == Event::Cable {
        let during = sampler.between(t_event, mono_ns());
        old_dropped_ms = during
            .iter()
            .find(|(_, h)| !h[idx(active)])
            .map(|(t, _)| (t - t_event) as f64 / 1e6);
        if old_dropped_ms.is_none() {
            note = "the cut-off active kept the VIP until re-plugged".into();
        }
        dc.plug(active);
    }
    // Restore the old active as the standby.
    match event {
        Event::Kill => pair.start(active),
        Event::PowerOff => {
            dc.power_on(active).await;
            sampler.set_powered(active, true);
            pair.start(active);
        }
        Event::Cable => {
            if !pair.running(active) || pair.system == System::ConsulLock && !pair.is_standby(active).await {
                // `consul lock` exits once it lost the lock (its child is
                // stopped): a service manager restarts it.
                let t_wait = Instant::now() + Duration::from_secs(30);
                while pair.running(active) && Instant::now() < t_wait {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if pair.running(active) {
                    note.push_str(if note.is_empty() { "" } else { "; " });
                    note.push_str("old holder still running 30 s after re-plug; restarted");
                    pair.kill(active);
                }
                // Its node is failed in gossip until serf reconnects (up to
                // 30 s): `consul lock` cannot create a session before, and
                // exits; a service manager would keep restarting it until
                // then. Start it once the node passes again.
                wait_serf_passing(dc, active).await?;
                pair.start(active);
            }
        }
    }
    if let Err(e) = pair
        .wait("the old active to be the standby", active, true, sampler)
        .await
    {
        if event == Event::Cable && pair.system == System::Halo {
            log(&format!("{e}; restarting it (see its log)"));
            note.push_str(if note.is_empty() { "" } else { "; " });
            note.push_str("old active did not return as standby after re-plug; restarted");
            pair.kill(active);
            pair.start(active);
            pair.wait("the restarted old active to be the standby", active, true, sampler)
                .await?;
        } else {
            return Err(e);
        }
    }
    // Attempts in flight at the answer end within a probe deadline.
    let settle = (t_answer + PROBE_DEADLINE.as_nanos() as i64 + 100_000_000 - mono_ns()).max(0);
    tokio::time::sleep(Duration::from_nanos(settle as u64)).await;
    if event == Event::Cable && s.cable_fresh && pair.system == System::Halo {
        // Measured before the restart: the samples up to here count.
        pair.kill(active);
        pair.start(active);
        pair.wait("the restarted old active to be the standby", active, true, sampler)
            .await?;
    }
    wait_steady(pl).await?;
    let t_end = mono_ns();
    let failed = pl.fails_between(t_event - PROBE_DEADLINE.as_nanos() as i64, t_answer);
    let samples = sampler.between(t_event, t_end);
    let two = samples.iter().filter(|(_, h)| h[0] && h[1]).count();
    let new_claimed_ms = samples
        .iter()
        .find(|(_, h)| h[idx(standby)])
        .map(|(t, _)| (t - t_event) as f64 / 1e6);
    Ok(Row {
        from: active.to_owned(),
        gap_ms,
        failed,
        samples: samples.len(),
        two_holders: two,
        old_dropped_ms,
        new_claimed_ms,
        unprovoked_before: false,
        note,
    })
}
