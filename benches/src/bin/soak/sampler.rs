//! Which balancer hosts hold the VIP, sampled from a thread of its own all
//! run long: the checker's evidence that two hosts never held it at once.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_testkit::dc::Datacenter;
use halo_testkit::netns::INTERFACE;

use crate::log;

/// How often the VIP holders are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Which balancer hosts hold the VIP, every [`SAMPLE_EVERY`] (`ip addr`;
/// a powered-off host, its `eth0` down, holds nothing).
#[derive(Debug)]
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, [bool; 2])>>,
}

impl Sampler {
    pub(crate) fn start(dc: &Datacenter) -> Sampler {
        let hosts = [dc.lb(1).netns().to_owned(), dc.lb(2).netns().to_owned()];
        let vip = dc.vip().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                samples.push((at, [holds(&hosts[0], &vip), holds(&hosts[1], &vip)]));
                std::thread::sleep(SAMPLE_EVERY.saturating_sub(at.elapsed()));
            }
            samples
        });
        Sampler { stop, thread }
    }

    pub(crate) fn stop(self) -> Vec<(Instant, [bool; 2])> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| {
            log("the VIP sampler panicked");
            Vec::new()
        })
    }
}

pub(crate) fn holds(netns: &str, vip: &str) -> bool {
    match Command::new("ip")
        .args(["-n", netns, "-4", "-o", "addr", "show", "dev", INTERFACE, "up"])
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .any(|w| w.split('/').next() == Some(vip)),
        Err(e) => {
            log(&format!("ip addr show in {netns}: {e}"));
            false
        }
    }
}
