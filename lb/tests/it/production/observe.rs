//! What the scenarios watch and check: the client's probes through the VIP
//! ([`Prober`]) and the gap they saw around an event ([`gap`]), which
//! balancer hosts hold the VIP ([`VipSampler`], checked by
//! [`assert_one_holder`]), and the instances' terms as active
//! ([`assert_no_overlap`]).

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_testkit::dc::Datacenter;
use serde_json::Value;

use super::SAMPLE_EVERY;

/// A term of some process, on the (shared) kernel clock.
#[derive(Debug, Clone)]
pub(super) struct TermRec {
    who: String,
    epoch: u64,
    from: u64,
    to: u64,
}

/// Its terms; an open one ends at `open_end`.
pub(super) fn terms(who: &str, status: &Value, open_end: u64) -> Vec<TermRec> {
    status["ha"]["terms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| TermRec {
            who: who.to_owned(),
            epoch: t["epoch"].as_u64().unwrap(),
            from: t["from_unix_us"].as_u64().unwrap(),
            to: t["to_unix_us"].as_u64().unwrap_or(open_end),
        })
        .collect()
}

/// Panics if two processes' terms overlap (or share an epoch); returns the
/// smallest gap between consecutive terms of different processes, in µs.
pub(super) fn assert_no_overlap(all: &[TermRec]) -> Option<u64> {
    let mut sorted = all.to_vec();
    sorted.sort_by_key(|t| t.from);
    for (n, a) in sorted.iter().enumerate() {
        for b in &sorted[n + 1..] {
            if a.who == b.who {
                continue;
            }
            assert!(
                a.to <= b.from || b.to <= a.from,
                "two actives at once: {a:?} overlaps {b:?} by {} ms; all terms: {sorted:#?}",
                (a.to.min(b.to) - a.from.max(b.from)) / 1000
            );
            assert_ne!(a.epoch, b.epoch, "two processes with one epoch: {a:?} {b:?}");
        }
    }
    sorted
        .windows(2)
        .filter(|w| w[0].who != w[1].who)
        .map(|w| w[1].from - w[0].to)
        .min()
}

/// One request through the VIP, from a thread inside the client host.
#[derive(Debug, Clone, Copy)]
pub(super) struct Probe {
    pub(super) at: Instant,
    /// The TCP handshake's duration, if it completed.
    pub(super) connect: Option<Duration>,
    /// Until the whole answer (or the failure).
    pub(super) took: Duration,
    pub(super) ok: bool,
}

/// Threads in a host's namespace that each send `GET /` to a target, one
/// request at a time, every few milliseconds, until stopped.
pub(super) struct Prober {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Probe>>>,
}

impl Prober {
    pub(super) fn start(
        netns: &str,
        target: SocketAddr,
        threads: usize,
        connect_timeout: Duration,
        answer_timeout: Duration,
    ) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|n| {
                let (stop, path) = (Arc::clone(&stop), format!("/var/run/netns/{netns}"));
                std::thread::spawn(move || {
                    let ns = std::fs::File::open(&path).unwrap();
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    // Staggered, so the threads together probe more often.
                    std::thread::sleep(Duration::from_millis(3 * n as u64));
                    let mut log = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        log.push(request(target, connect_timeout, answer_timeout));
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    log
                })
            })
            .collect();
        Prober { stop, threads }
    }

    pub(super) fn stop(self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Probe> = self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_by_key(|p| p.at);
        all
    }
}

fn request(target: SocketAddr, connect_timeout: Duration, answer_timeout: Duration) -> Probe {
    let at = Instant::now();
    let failed = |connect| Probe {
        at,
        connect,
        took: at.elapsed(),
        ok: false,
    };
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&target, connect_timeout) else {
        return failed(None);
    };
    let connect = Some(at.elapsed());
    if stream.set_read_timeout(Some(answer_timeout)).is_err()
        || stream.write_all(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n").is_err()
    {
        return failed(connect);
    }
    // The listing is small; a bound all the same.
    let mut answer = Vec::new();
    if (&mut stream).take(64 * 1024).read_to_end(&mut answer).is_err() {
        return failed(connect);
    }
    Probe {
        at,
        connect,
        took: at.elapsed(),
        ok: answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200"),
    }
}

/// The client's gap around an event at `from`: the longest time between
/// the starts of two successive successful probes, counting from the last
/// success before `from` through the successes started in `[from, to]`;
/// `None` if none started then (or none before).
pub(super) fn gap(probes: &[Probe], from: Instant, to: Instant) -> Option<Duration> {
    let mut prev = probes
        .iter()
        .filter(|p| p.ok && p.at < from)
        .map(|p| p.at)
        .next_back()?;
    let mut worst = None;
    for p in probes.iter().filter(|p| p.ok && p.at >= from && p.at <= to) {
        worst = Some(worst.unwrap_or(Duration::ZERO).max(p.at - prev));
        prev = p.at;
    }
    worst
}

/// Which balancer hosts hold the VIP, sampled by a thread every
/// [`SAMPLE_EVERY`] with `ip -n <netns> addr show`.
pub(super) struct VipSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Vec<usize>)>>,
}

impl VipSampler {
    pub(super) fn start(dc: &Datacenter) -> VipSampler {
        let hosts: Vec<(usize, String)> = (1..=dc.spec().balancers)
            .map(|i| (i, dc.lb(i).netns().to_owned()))
            .collect();
        let vip = dc.vip().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let holders = hosts
                    .iter()
                    .filter(|(_, ns)| holds(ns, &vip))
                    .map(|(i, _)| *i)
                    .collect();
                samples.push((at, holders));
                std::thread::sleep(SAMPLE_EVERY.saturating_sub(at.elapsed()));
            }
            samples
        });
        VipSampler { stop, thread }
    }

    pub(super) fn stop(self) -> Vec<(Instant, Vec<usize>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn holds(netns: &str, vip: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", netns, "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("run ip addr show");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w.split('/').next() == Some(vip))
}

/// A balancer host whose holding the VIP is excused: its process was
/// killed, its host powered off, or its process frozen.
#[derive(Debug, Clone, Copy)]
pub(super) struct Excuse {
    pub(super) lb: usize,
    pub(super) from: Instant,
    pub(super) until: Instant,
}

/// Panics if a sample shows two balancer hosts holding the VIP, excused
/// ones aside; returns (samples, samples with no holder).
pub(super) fn assert_one_holder(samples: &[(Instant, Vec<usize>)], excuses: &[Excuse]) -> (usize, usize) {
    let mut empty = 0;
    for (at, holders) in samples {
        let counted: Vec<usize> = holders
            .iter()
            .copied()
            .filter(|lb| !excuses.iter().any(|e| e.lb == *lb && e.from <= *at && *at <= e.until))
            .collect();
        assert!(
            counted.len() <= 1,
            "two hosts hold the VIP at once: lb{counted:?} at {:?} after the first sample",
            *at - samples[0].0
        );
        empty += usize::from(holders.is_empty());
    }
    (samples.len(), empty)
}

#[test]
fn gap_is_the_longest_run_between_successes() {
    let t0 = Instant::now();
    let probe = |ms: u64, ok: bool| Probe {
        at: t0 + Duration::from_millis(ms),
        connect: None,
        took: Duration::ZERO,
        ok,
    };
    let probes = [
        probe(0, true),
        probe(10, true),
        probe(20, false),
        probe(200, false),
        probe(410, true),
        probe(420, true),
    ];
    let g = gap(&probes, t0 + Duration::from_millis(15), t0 + Duration::from_millis(500));
    assert_eq!(g, Some(Duration::from_millis(400)));
    assert_eq!(
        gap(
            &probes,
            t0 + Duration::from_millis(500),
            t0 + Duration::from_millis(600)
        ),
        None
    );
}
