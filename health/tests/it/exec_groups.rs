//! Exec probes run in a process group of their own and take it down with
//! them: nothing a probe starts outlives it, and a backgrounded grandchild
//! holding the output pipe neither delays nor fails the probe.

use std::time::{Duration, Instant};

use halo_health::probe::MAX_OUTPUT;
use halo_health::{Outcome, Prober};
use halo_testkit::eventually;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::exec;

/// Pids of live processes whose command line contains `needle` (zombies
/// have an empty command line and don't count).
fn processes_with(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // A process may exit between listing and reading: skip it.
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

/// Kills, when dropped, whatever still runs with `needle` in its command
/// line, so a failing test leaves no `sleep` behind.
struct Reaper(&'static str);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in processes_with(self.0) {
            if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGKILL) {
                eprintln!("cannot kill leftover {pid} ({}): {e}", self.0);
            }
        }
    }
}

async fn none_left(needle: &'static str) {
    eventually(
        Duration::from_secs(5),
        &format!("no process running {needle:?}"),
        || async { processes_with(needle).is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_timed_out_probe_kills_its_grandchildren() {
    let _reaper = Reaper("sleep 986");
    let p = Prober::default();
    for _ in 0..4 {
        let start = Instant::now();
        let r = p
            .run(&exec(&["/bin/sh", "-c", "sleep 986; true"]), Duration::from_millis(300))
            .await;
        assert_eq!(r.outcome, Outcome::Fail);
        assert!(r.output.contains("timed out"), "{}", r.output);
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    }
    none_left("sleep 986").await;
}

#[tokio::test]
async fn a_dropped_probe_kills_its_process_group() {
    let _reaper = Reaper("sleep 988");
    let p = Prober::default();
    let probe = exec(&["/bin/sh", "-c", "sleep 988; true"]);
    let run = p.run(&probe, Duration::from_secs(60));
    // The sleep must have started before the probe is dropped, or the test
    // proves nothing.
    let dropped_after_start = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => panic!("the probe ended early: {r:?}"),
            () = eventually(Duration::from_secs(5), "the probe's sleep to start", || async {
                (!processes_with("sleep 988").is_empty()).then_some(())
            }) => {}
        }
    })
    .await;
    assert!(dropped_after_start.is_ok());
    none_left("sleep 988").await;
}

#[tokio::test]
async fn a_grandchild_holding_the_pipe_neither_delays_nor_fails_the_probe() {
    let _reaper = Reaper("sleep 987");
    let p = Prober::default();
    let start = Instant::now();
    let r = p
        .run(
            &exec(&["/bin/sh", "-c", "sleep 987 & echo started"]),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!((r.outcome, r.output.as_str()), (Outcome::Pass, "started"));
    // EXIT_GRACE (100ms) after the shell's exit, not the 30s deadline.
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    none_left("sleep 987").await;
}

#[tokio::test]
async fn exec_output_is_capped_on_a_character_boundary() {
    let p = Prober::default();
    // Both streams flooded, in two-byte characters; the cap falls mid-way.
    let r = p
        .run(
            &exec(&[
                "sh",
                "-c",
                "i=0; while [ $i -lt 3000 ]; do printf 'éé'; printf 'ü' >&2; i=$((i+1)); done",
            ]),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(r.outcome, Outcome::Pass, "{}", r.output);
    assert!(r.output.len() <= MAX_OUTPUT, "{} bytes", r.output.len());
    assert!(r.output.starts_with("éé"), "{}", &r.output[..20]);
    assert!(r.output.ends_with("…(truncated)"), "the cut is marked");
    assert!(!r.output.contains('\u{fffd}'), "no character was split");

    // Endless output until the deadline: the probe stops reading there.
    let start = Instant::now();
    let r = p.run(&exec(&["yes", "spam"]), Duration::from_millis(300)).await;
    assert_eq!(r.outcome, Outcome::Fail);
    assert!(
        r.output.starts_with("timed out") && r.output.contains("spam"),
        "what it printed before the deadline is kept: {}",
        &r.output[..100]
    );
    assert!(r.output.len() <= MAX_OUTPUT, "{} bytes", r.output.len());
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}
