//! The results as a Markdown table, one row per system and event, with the
//! run's conditions under it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use crate::rounds::Row;
use crate::settings::{Event, Settings, System};
use crate::{started, SAMPLE_EVERY, SETTLED, VIP_PORT};

fn fmt_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn render(
    s: &Settings,
    dc_desc: &str,
    results: &BTreeMap<(System, Event), Vec<Row>>,
    notes: &[String],
) -> String {
    let mut out = String::from(
        "| system | event | rounds | median gap | worst gap | samples with two VIP holders | notes |\n|---|---|---|---|---|---|---|\n",
    );
    let order = [System::Halo, System::Keepalived, System::ConsulLock];
    for system in order.into_iter().filter(|x| s.systems.contains(x)) {
        for &event in &s.events {
            let label = format!("| {} | {} ", system.label(), event.label(system));
            let Some(rows) = results.get(&(system, event)) else {
                let why = if system == System::Keepalived {
                    s.keepalived_note.clone().unwrap_or_else(|| "not run".into())
                } else {
                    "not run (see below)".into()
                };
                let _infallible = writeln!(out, "{label}| 0 | n/a | n/a | n/a | skipped: {why} |");
                continue;
            };
            if rows.is_empty() {
                let _infallible = writeln!(out, "{label}| 0 | n/a | n/a | n/a | no round completed |");
                continue;
            }
            let mut gaps: Vec<f64> = rows.iter().map(|r| r.gap_ms).collect();
            let worst = gaps.iter().copied().fold(0.0, f64::max);
            let med = median(&mut gaps);
            let mut failed: Vec<f64> = rows.iter().map(|r| r.failed as f64).collect();
            let two: usize = rows.iter().map(|r| r.two_holders).sum();
            let samples: usize = rows.iter().map(|r| r.samples).sum();
            let rounds_two = rows.iter().filter(|r| r.two_holders > 0).count();
            let mut note = format!("failed attempts per event: median {:.0}", median(&mut failed));
            let mut claimed: Vec<f64> = rows.iter().filter_map(|r| r.new_claimed_ms).collect();
            if !claimed.is_empty() {
                let _infallible = write!(
                    note,
                    "; new holder has the VIP after {} (median)",
                    fmt_ms(median(&mut claimed))
                );
            }
            if event == Event::Cable {
                let mut dropped: Vec<f64> = rows.iter().filter_map(|r| r.old_dropped_ms).collect();
                let kept = rows.len() - dropped.len();
                if !dropped.is_empty() {
                    let _infallible = write!(
                        note,
                        "; cut-off active removed the VIP itself after {} (median, {} rounds)",
                        fmt_ms(median(&mut dropped)),
                        dropped.len()
                    );
                }
                if kept > 0 {
                    let _infallible = write!(note, "; kept it until re-plugged in {kept} rounds");
                }
            }
            let unprovoked = rows.iter().filter(|r| r.unprovoked_before).count();
            if unprovoked > 0 {
                let _infallible = write!(
                    note,
                    "; {unprovoked} handovers between rounds with no fault injected (see the logs)"
                );
            }
            let odd: Vec<&str> = rows
                .iter()
                .map(|r| r.note.as_str())
                .filter(|n| !n.is_empty() && !n.starts_with("the cut-off"))
                .collect();
            if !odd.is_empty() {
                let _infallible = write!(note, "; {} rounds: {}", odd.len(), odd[0]);
            }
            let _infallible = writeln!(
                out,
                "{label}| {} | {} | {} | {two} of {samples} (in {rounds_two} rounds) | {note} |",
                rows.len(),
                fmt_ms(med),
                fmt_ms(worst)
            );
        }
    }
    let _infallible = write!(
        out,
        "\nRun {} UTC by `benches/failover.sh`, {} cores, in {:.0} s; halo-lb {}, {}, {}. Topology: halo_testkit::dc — 3 Consul servers, \
         a Consul client agent on each balancer, backend and client host (each in its own network namespace on one bridge, \
         198.18.x.0/24), VIP .100/24 on `eth0`; Consul timing: {dc_desc}. Client on the client host: a TCP connection to VIP:{VIP_PORT} \
         every 5 ms (1 s deadline), greeting read to EOF; gap = the longest time between two consecutive answers from the last answer \
         before the event to the first answer from the new active. VIP holders sampled every {} ms (`ip addr` of both balancers; a \
         powered-off host holds nothing). After kill -9 the harness removes the dead process's leftover address at once, as a \
         service manager would (`halo-lb release-vip`; `ip addr del` for the others). Power-off and cable: the host stays off / unplugged for {} s (at \
         least 2 s after the standby answered), then is powered on (agent restarted, system started again) / plugged back; the old active must come back as the standby before the next round, and a round starts only once one balancer has answered alone for {} s \
         and is the active while the other is a ready standby. Raw data: \
         benches/results/{}/.\n",
        utc_now(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        started().elapsed().as_secs_f64(),
        s.halo_commit,
        version(&s.consul, &["version"]),
        s.keepalived.as_ref().map_or("keepalived not run".into(), |k| version(k, &["--version"])),
        SAMPLE_EVERY.as_millis(),
        s.fault_seconds,
        SETTLED.as_secs(),
        s.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    );
    if s.cable_fresh && s.events.contains(&Event::Cable) {
        out.push_str(
            "\nFAILOVER_CABLE_FRESH=1: after each cable round the old active (by then the standby) was restarted, so no \
             round's standby carried the damping of forced takeovers left by the round before.\n",
        );
    }
    for n in notes {
        let _infallible = writeln!(out, "\n{n}.");
    }
    out
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn version(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("?").trim().to_owned()
        })
        .unwrap_or_else(|e| format!("{} ({e})", bin.display()))
}
