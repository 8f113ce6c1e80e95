//! Which balancer hosts hold the VIP, sampled from a thread of its own
//! while the benchmark runs: the evidence for "two holders", and when the
//! cut-off or the new active dropped or claimed it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use halo_testkit::dc::Datacenter;
use halo_testkit::netns::INTERFACE;

use crate::{mono_ns, BALANCERS, SAMPLE_EVERY};

/// Which balancer hosts hold the VIP, every [`SAMPLE_EVERY`]: `ip -4 addr`
/// of each balancer's `eth0`, ignoring a host while it is powered off.
/// (CLOCK_MONOTONIC ns, whether lb1 and lb2 held the VIP).
type Samples = Arc<Mutex<Vec<(i64, [bool; 2])>>>;

#[derive(Debug)]
pub(crate) struct Sampler {
    samples: Samples,
    powered: Arc<[AtomicBool; 2]>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub(crate) fn start(dc: &Datacenter, ip: PathBuf) -> Sampler {
        let netns: Vec<String> = BALANCERS.iter().map(|h| dc.host(h).netns().to_owned()).collect();
        let vip = format!("inet {}/", dc.vip());
        let samples: Samples = Arc::default();
        let powered = Arc::new([AtomicBool::new(true), AtomicBool::new(true)]);
        let stop = Arc::new(AtomicBool::new(false));
        let (s, p, st) = (Arc::clone(&samples), Arc::clone(&powered), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let t = mono_ns();
                let mut held = [false; 2];
                for (i, ns) in netns.iter().enumerate() {
                    let out = Command::new(&ip)
                        .args(["-n", ns, "-4", "-o", "addr", "show", "dev", INTERFACE])
                        .output();
                    held[i] = match out {
                        Ok(o) => String::from_utf8_lossy(&o.stdout).contains(&vip) && p[i].load(Ordering::SeqCst),
                        Err(e) => {
                            eprintln!("sampler: ip: {e}");
                            false
                        }
                    };
                }
                s.lock().unwrap_or_else(PoisonError::into_inner).push((t, held));
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Sampler {
            samples,
            powered,
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn set_powered(&self, host: &str, on: bool) {
        self.powered[idx(host)].store(on, Ordering::SeqCst);
    }

    /// Samples taken in [from, to].
    pub(crate) fn between(&self, from: i64, to: i64) -> Vec<(i64, [bool; 2])> {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        s.iter().filter(|(t, _)| *t >= from && *t <= to).copied().collect()
    }

    pub(crate) fn holders_now(&self) -> Option<[bool; 2]> {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        s.last().map(|(_, h)| *h)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("sampler thread panicked");
            }
        }
    }
}

pub(crate) fn idx(host: &str) -> usize {
    BALANCERS.iter().position(|h| *h == host).expect("a balancer host")
}
