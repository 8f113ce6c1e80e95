//! The client host's threads, in its network namespace for the whole run:
//! new connections to the VIP at a steady rate, each checked for the echo
//! of what it sent, and a few long-lived streams whose bytes are checked end
//! to end. What they saw ([`Seen`]: attempts, breaks, corruption) is shared
//! with the fault loop (is the client served steadily?) and the checker.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::settings::Settings;
use crate::{log, ms};

/// A new connection's connect deadline (so an unserved VIP costs an
/// attempt this long, not a SYN retransmit) and answer deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(150);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// A stream that sees no echo for this long is counted broken. Longer
/// than a Consul election at raft_multiplier 1, so a stream that the same
/// active serves again after a suspension is seen to survive it.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a new connection sends (and expects back).
const PAYLOAD: usize = 64;

/// How a stream broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Break {
    /// The peer closed it (a FIN: the balancer's process exited).
    Eof,
    /// A reset (a host that does not know the connection: the new holder).
    Reset,
    /// No echo for STREAM_TIMEOUT.
    Timeout,
    /// Another error, or corruption (counted as such).
    Other,
}

impl Break {
    pub(crate) fn of(e: &std::io::Error) -> Break {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Break::Reset,
            K::WouldBlock | K::TimedOut => Break::Timeout,
            K::UnexpectedEof => Break::Eof,
            _ => Break::Other,
        }
    }

    pub(crate) fn key(self) -> &'static str {
        match self {
            Break::Eof => "closed",
            Break::Reset => "reset",
            Break::Timeout => "timed out",
            Break::Other => "other",
        }
    }
}

/// One new connection through the VIP.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    pub(crate) at: Instant,
    pub(crate) ok: bool,
}

/// What the clients saw, shared with their threads.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    pub(crate) attempts: Mutex<Vec<Attempt>>,
    /// Corrupted answers and stream bytes, described.
    pub(crate) corruptions: Mutex<Vec<String>>,
    /// How streams broke (EOF, reset, or no echo for STREAM_TIMEOUT),
    /// each at the last time it made progress: when it stopped working,
    /// not when the client noticed (up to STREAM_TIMEOUT later).
    pub(crate) breaks: Mutex<Vec<(Instant, Break)>>,
    pub(crate) stream_bytes: AtomicU64,
    pub(crate) conn_bytes: AtomicU64,
    pub(crate) stream_opens: AtomicU64,
}

impl Seen {
    pub(crate) fn attempts(&self) -> std::sync::MutexGuard<'_, Vec<Attempt>> {
        self.attempts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn corrupt(&self, what: String) {
        log(&format!("CORRUPTION: {what}"));
        self.corruptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(what);
    }

    /// Served steadily: a success in the last 300 ms and no failure in the
    /// last 1.2 s.
    pub(crate) fn steady(&self) -> bool {
        let now = Instant::now();
        let a = self.attempts();
        let recent = a
            .iter()
            .rev()
            .take_while(|x| now.duration_since(x.at) < Duration::from_millis(1200));
        let mut ok_recent = false;
        for x in recent {
            if !x.ok {
                return false;
            }
            ok_recent |= now.duration_since(x.at) < Duration::from_millis(300);
        }
        ok_recent
    }

    pub(crate) fn served_after(&self, t: Instant) -> bool {
        self.attempts().iter().rev().any(|x| x.ok && x.at >= t)
    }
}

/// The client host's threads: new connections and long-lived streams.
#[derive(Debug)]
pub(crate) struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub(crate) seen: Arc<Seen>,
}

/// Enters `netns` on the calling thread.
fn enter(netns: &str) -> std::io::Result<()> {
    let ns = std::fs::File::open(format!("/var/run/netns/{netns}"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

impl Clients {
    pub(crate) fn start(netns: &str, vip: SocketAddr, s: &Settings) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let mut threads = Vec::new();
        // Four connection threads, staggered, together at `rate`.
        let conn_threads = 4u64;
        let every = Duration::from_micros(1_000_000 * conn_threads / s.rate);
        for n in 0..conn_threads {
            let (stop, seen, netns) = (Arc::clone(&stop), Arc::clone(&seen), netns.to_owned());
            let seed = s.seed ^ (0xc0ee_0000 + n);
            threads.push(std::thread::spawn(move || {
                if let Err(e) = enter(&netns) {
                    log(&format!("client thread cannot enter {netns}: {e}"));
                    return;
                }
                let mut rng = fastrand::Rng::with_seed(seed);
                std::thread::sleep(every / 4 * u32::try_from(n).unwrap_or(0));
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    let ok = one_connection(vip, &mut rng, &seen);
                    seen.attempts().push(Attempt { at: began, ok });
                    std::thread::sleep(every.saturating_sub(began.elapsed()));
                }
            }));
        }
        for n in 0..s.streams {
            let (stop, seen, netns) = (Arc::clone(&stop), Arc::clone(&seen), netns.to_owned());
            let seed = s.seed ^ (0x5743_0000 + n as u64);
            threads.push(std::thread::spawn(move || {
                if let Err(e) = enter(&netns) {
                    log(&format!("stream thread cannot enter {netns}: {e}"));
                    return;
                }
                stream_loop(n, vip, seed, &stop, &seen);
            }));
        }
        Clients { stop, threads, seen }
    }

    pub(crate) fn stop(self) -> Arc<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            if t.join().is_err() {
                log("a client thread panicked");
            }
        }
        self.seen
    }
}

/// One connection: sends PAYLOAD random bytes, expects them back. A short
/// answer that matches so far is a failure (a failover broke it); any
/// differing byte is corruption.
fn one_connection(vip: SocketAddr, rng: &mut fastrand::Rng, seen: &Seen) -> bool {
    let payload: Vec<u8> = (0..PAYLOAD).map(|_| rng.u8(..)).collect();
    let Ok(mut stream) = TcpStream::connect_timeout(&vip, CONNECT_TIMEOUT) else {
        return false;
    };
    if stream.set_read_timeout(Some(ANSWER_TIMEOUT)).is_err() || stream.write_all(&payload).is_err() {
        return false;
    }
    let mut got = [0u8; PAYLOAD];
    let mut have = 0;
    while have < PAYLOAD {
        match stream.read(&mut got[have..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
    }
    if got[..have] != payload[..have] {
        let at = got[..have].iter().zip(&payload).position(|(a, b)| a != b).unwrap_or(0);
        seen.corrupt(format!(
            "a new connection's answer differs at byte {at} of {have}: got {:02x?}, sent {:02x?}",
            &got[..have],
            &payload[..]
        ));
        return false;
    }
    seen.conn_bytes.fetch_add(have as u64, Ordering::Relaxed);
    have == PAYLOAD
}

/// A long-lived stream through the VIP, re-opened when it breaks: chunks of
/// a seeded pseudo-random sequence (one per stream and connection), each
/// read back and compared before the next is sent.
fn stream_loop(n: usize, vip: SocketAddr, seed: u64, stop: &AtomicBool, seen: &Seen) {
    let mut generation = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect_timeout(&vip, Duration::from_millis(500)) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        generation += 1;
        seen.stream_opens.fetch_add(1, Ordering::Relaxed);
        if stream.set_read_timeout(Some(STREAM_TIMEOUT)).is_err()
            || stream.set_write_timeout(Some(STREAM_TIMEOUT)).is_err()
        {
            continue;
        }
        let mut rng = fastrand::Rng::with_seed(seed ^ generation.rotate_left(32));
        let mut offset = 0u64;
        let mut progress = Instant::now();
        let mut chunk = Vec::with_capacity(4096);
        let mut back = vec![0u8; 4096];
        let broken = loop {
            if stop.load(Ordering::Relaxed) {
                break None;
            }
            let len = rng.usize(1..=4096);
            chunk.clear();
            chunk.extend((0..len).map(|_| rng.u8(..)));
            if let Err(e) = stream.write_all(&chunk) {
                break Some(Break::of(&e));
            }
            let mut have = 0;
            let mut failed = None;
            while have < len {
                match stream.read(&mut back[have..len]) {
                    Ok(0) => {
                        failed = Some(Break::Eof);
                        break;
                    }
                    Err(e) => {
                        failed = Some(Break::of(&e));
                        break;
                    }
                    Ok(k) => {
                        if back[have..have + k] != chunk[have..have + k] {
                            let at = (have..have + k).find(|i| back[*i] != chunk[*i]).unwrap_or(have);
                            seen.corrupt(format!(
                                "stream {n} connection {generation}: byte {} differs (got {:#04x}, sent {:#04x})",
                                offset + at as u64,
                                back[at],
                                chunk[at]
                            ));
                            failed = Some(Break::Other);
                            break;
                        }
                        have += k;
                    }
                }
            }
            offset += have as u64;
            seen.stream_bytes.fetch_add(have as u64, Ordering::Relaxed);
            if failed.is_some() {
                break failed;
            }
            progress = Instant::now();
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(how) = broken {
            // A stream cut by the end of the run is no break.
            if !stop.load(Ordering::Relaxed) {
                log(&format!(
                    "stream {n} connection {generation} broke ({}) after {offset} bytes, {} after its last echo",
                    how.key(),
                    ms(progress.elapsed())
                ));
                seen.breaks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((progress, how));
            }
        }
    }
}
