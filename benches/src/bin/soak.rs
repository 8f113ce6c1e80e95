//! A bounded soak with chaos in the production-shaped datacenter
//! (`halo_testkit::dc`): three Consul servers (`raft_multiplier = 1`,
//! Consul's default gossip), a client agent on every other host, halo-lb on
//! `lb1` and `lb2` as a pair with a floating VIP, two backend hosts each
//! running an echo server registered by halo-sidecar, and a client host.
//!
//! For `SOAK_SECONDS` it injects faults one at a time, in seeded random
//! order (every kind once per cycle, cycles shuffled), with recovery
//! between (the pair whole again, the standby undamped, the client served
//! steadily), while steady clients on the client host run throughout:
//! new connections to the VIP at a steady rate, each checked for the echo
//! of what it sent, and a few long-lived streams whose bytes are checked end
//! to end. At the end a checker works out, from every instance's own
//! `/status` `ha.terms` and from samples of which balancer hosts hold the
//! VIP, that no two active terms overlapped and that two hosts never held
//! the VIP at once (a killed, frozen or powered-off host's leftover address
//! excused); that every client gap stayed within its fault's bound; that no
//! byte came back corrupted; and that every halo-lb process's descriptors
//! and RSS stayed flat over its life. It prints a table and exits non-zero
//! on any violation.
//!
//! Run through `benches/soak.sh` (see benches/README.md, "Soak"), which
//! builds the binaries and passes them in the environment
//! ([`Settings::from_env`]). `soak echo <addr>` is the backends' echo
//! server (this binary, started in a backend host).
//!
//! Every process it starts runs in a host of the datacenter and is killed
//! by pid when its guard drops; the datacenter removes the namespaces and
//! everything left in them on drop, also on SIGINT or SIGTERM.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use halo_testkit::dc::{Datacenter, DcSpec};
use halo_testkit::netns::{HostProcess, INTERFACE, PREFIX_LEN};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The VIP's port; the echo servers' port on the backend hosts.
const VIP_PORT: u16 = 7000;
const ECHO_PORT: u16 = 7100;
/// halo-lb's admin API on loopback, as a user configures it; its probe
/// responder listens on the same port (UDP) at the host's address.
const ADMIN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9901));
const PROBE_PORT: u16 = 9901;
/// halo-sidecar's admin API on a backend host.
const SIDECAR_PORT: u16 = 9903;
const BACKENDS: usize = 2;
/// How often the VIP holders are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Longest wait for a role, a restart, a re-join.
const READY: Duration = Duration::from_secs(120);
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
/// Growth over a process's life beyond which its descriptors or RSS are
/// not flat: generous, since a process that starts as a standby and ends
/// as the active holds listeners, connections and their buffers.
const FD_GROWTH: usize = 64;
const RSS_GROWTH_KIB: u64 = 32 * 1024;
/// A stream's last echo comes up to a chunk's round trip (and the 10 ms
/// between chunks) before the fault that broke it: a break counts for the
/// fault that started within this long after its last echo. Faults are
/// seconds apart, with the client steady before each.
const BREAK_SLACK: Duration = Duration::from_millis(250);
/// No new fault starts this close to the end.
const TAIL: Duration = Duration::from_secs(15);

type Res<T> = Result<T, String>;

fn log(msg: &str) {
    eprintln!("[soak {:>7.1}s] {msg}", started().elapsed().as_secs_f64());
}

fn started() -> Instant {
    static T: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T.get_or_init(Instant::now)
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn other(i: usize) -> usize {
    3 - i
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

// ------------------------------------------------------------------ faults

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill,
    Sigstop,
    PowerOff,
    Cable,
    CutApart,
    LeaderKill,
    ProbeDrop,
    ForgedIcmp,
}

impl Fault {
    const ALL: [Fault; 8] = [
        Fault::Kill,
        Fault::Sigstop,
        Fault::PowerOff,
        Fault::Cable,
        Fault::CutApart,
        Fault::LeaderKill,
        Fault::ProbeDrop,
        Fault::ForgedIcmp,
    ];

    fn key(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Sigstop => "sigstop",
            Fault::PowerOff => "power-off",
            Fault::Cable => "cable",
            Fault::CutApart => "cut-apart",
            Fault::LeaderKill => "leader-kill",
            Fault::ProbeDrop => "probe-drop",
            Fault::ForgedIcmp => "forged-icmp",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9 of the active halo-lb",
            Fault::Sigstop => "SIGSTOP of the active halo-lb",
            Fault::PowerOff => "power-off of the active host",
            Fault::Cable => "cable pull of the active host",
            Fault::CutApart => "the two balancers cut apart",
            Fault::LeaderKill => "the Consul leader killed",
            Fault::ProbeDrop => "probe traffic between the balancers dropped",
            Fault::ForgedIcmp => "forged ICMP port-unreachable at the standby's probe socket",
        }
    }

    /// The longest client gap allowed around it: several times halo's goals
    /// for the failovers (as lb/tests/it/production.rs bounds them), an
    /// election plus a confirmation for the leader kill, and for the faults
    /// that must not cost a failover of their own (or one handover at
    /// most), a few hundred milliseconds.
    fn bound(self) -> Duration {
        match self {
            Fault::Kill => Duration::from_secs(2),
            Fault::Sigstop => Duration::from_secs(5),
            Fault::PowerOff | Fault::Cable => Duration::from_secs(4),
            Fault::LeaderKill => Duration::from_secs(30),
            Fault::CutApart | Fault::ProbeDrop => Duration::from_millis(800),
            Fault::ForgedIcmp => Duration::from_millis(300),
        }
    }

    /// The most handovers (a term of another process than the last one)
    /// that may start while it lasts, where it has a limit.
    fn max_handovers(self) -> Option<usize> {
        match self {
            Fault::CutApart | Fault::ProbeDrop => Some(1),
            Fault::ForgedIcmp => Some(0),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------- settings

#[derive(Debug, Clone)]
struct Settings {
    halo_lb: PathBuf,
    halo_sidecar: PathBuf,
    halo_commit: String,
    out: PathBuf,
    seconds: u64,
    seed: u64,
    faults: Vec<Fault>,
    /// New connections per second.
    rate: u64,
    streams: usize,
    /// Steady time between a recovery and the next fault.
    quiet: Duration,
}

impl Settings {
    fn from_env() -> Res<Settings> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let need = |k: &str| var(k).ok_or_else(|| format!("{k} is not set (run benches/soak.sh)"));
        let num = |k: &str, d: u64| -> Res<u64> {
            var(k).map_or(Ok(d), |v| v.parse().map_err(|e| format!("{k}={v:?}: {e}")))
        };
        let mut faults = Vec::new();
        match var("SOAK_FAULTS") {
            None => faults.extend(Fault::ALL),
            Some(list) => {
                for f in list.split(',') {
                    let f = f.trim();
                    faults.push(
                        *Fault::ALL
                            .iter()
                            .find(|k| k.key() == f)
                            .ok_or_else(|| format!("SOAK_FAULTS: unknown fault {f:?}"))?,
                    );
                }
            }
        }
        let seed = match var("SOAK_SEED") {
            Some(v) => v.parse().map_err(|e| format!("SOAK_SEED={v:?}: {e}"))?,
            None => unix_us() % 1_000_000_007,
        };
        let rate = num("SOAK_RATE", 100)?;
        if rate == 0 || rate > 2000 {
            return Err(format!("SOAK_RATE={rate}: 1..=2000 connections per second"));
        }
        Ok(Settings {
            halo_lb: need("SOAK_HALO_LB")?.into(),
            halo_sidecar: need("SOAK_HALO_SIDECAR")?.into(),
            halo_commit: var("SOAK_HALO_COMMIT").unwrap_or_else(|| "?".into()),
            out: need("SOAK_OUT")?.into(),
            seconds: num("SOAK_SECONDS", 1800)?,
            seed,
            faults,
            rate,
            streams: usize::try_from(num("SOAK_STREAMS", 4)?).map_err(|e| e.to_string())?,
            quiet: Duration::from_millis(num("SOAK_QUIET_MS", 2000)?),
        })
    }
}

// ------------------------------------------------------------ echo server

/// The most connections the echo server serves at once.
const ECHO_MAX_CONNS: usize = 2000;

/// `soak echo <addr>`: echoes every byte back until the peer closes.
fn echo_main(addr: &str) -> ExitCode {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("soak echo: bind {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let live = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        match stream {
            Ok(stream) if live.load(Ordering::Relaxed) < ECHO_MAX_CONNS => {
                live.fetch_add(1, Ordering::Relaxed);
                let live = Arc::clone(&live);
                std::thread::spawn(move || {
                    if let Err(e) = echo(stream) {
                        // Resets are what a failover does to a stream.
                        if !matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                        ) {
                            eprintln!("soak echo: {e}");
                        }
                    }
                    live.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Ok(stream) => drop(stream),
            Err(e) => {
                eprintln!("soak echo: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    ExitCode::SUCCESS
}

fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    // A peer gone silent (its balancer died) is let go.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

// ----------------------------------------------------------------- clients

/// How a stream broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Break {
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
    fn of(e: &std::io::Error) -> Break {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Break::Reset,
            K::WouldBlock | K::TimedOut => Break::Timeout,
            K::UnexpectedEof => Break::Eof,
            _ => Break::Other,
        }
    }

    fn key(self) -> &'static str {
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
struct Attempt {
    at: Instant,
    ok: bool,
}

/// What the clients saw, shared with their threads.
#[derive(Debug, Default)]
struct Seen {
    attempts: Mutex<Vec<Attempt>>,
    /// Corrupted answers and stream bytes, described.
    corruptions: Mutex<Vec<String>>,
    /// How streams broke (EOF, reset, or no echo for STREAM_TIMEOUT),
    /// each at the last time it made progress: when it stopped working,
    /// not when the client noticed (up to STREAM_TIMEOUT later).
    breaks: Mutex<Vec<(Instant, Break)>>,
    stream_bytes: AtomicU64,
    conn_bytes: AtomicU64,
    stream_opens: AtomicU64,
}

impl Seen {
    fn attempts(&self) -> std::sync::MutexGuard<'_, Vec<Attempt>> {
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
    fn steady(&self) -> bool {
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

    fn served_after(&self, t: Instant) -> bool {
        self.attempts().iter().rev().any(|x| x.ok && x.at >= t)
    }
}

/// The client host's threads: new connections and long-lived streams.
#[derive(Debug)]
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    seen: Arc<Seen>,
}

/// Enters `netns` on the calling thread.
fn enter(netns: &str) -> std::io::Result<()> {
    let ns = std::fs::File::open(format!("/var/run/netns/{netns}"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}

impl Clients {
    fn start(netns: &str, vip: SocketAddr, s: &Settings) -> Clients {
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

    fn stop(self) -> Arc<Seen> {
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

// --------------------------------------------------------------- VIP sampler

/// Which balancer hosts hold the VIP, every [`SAMPLE_EVERY`] (`ip addr`;
/// a powered-off host, its `eth0` down, holds nothing).
#[derive(Debug)]
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, [bool; 2])>>,
}

impl Sampler {
    fn start(dc: &Datacenter) -> Sampler {
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

    fn stop(self) -> Vec<(Instant, [bool; 2])> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_else(|_| {
            log("the VIP sampler panicked");
            Vec::new()
        })
    }
}

fn holds(netns: &str, vip: &str) -> bool {
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

// ------------------------------------------------------------------ the pair

/// `/proc` figures of a process.
#[derive(Debug, Clone, Copy)]
struct ProcStat {
    fds: usize,
    rss_kib: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(ProcStat { fds, rss_kib })
}

/// One halo-lb process's life.
#[derive(Debug, Clone)]
struct Life {
    who: String,
    born: Instant,
    died: Option<Instant>,
    start: Option<ProcStat>,
    end: Option<ProcStat>,
    /// The most seen at any sample (after each recovery, and the end).
    peak: Option<ProcStat>,
    how: &'static str,
}

impl Life {
    fn saw(&mut self, s: Option<ProcStat>) {
        if let Some(s) = s {
            let p = self.peak.get_or_insert(s);
            p.fds = p.fds.max(s.fds);
            p.rss_kib = p.rss_kib.max(s.rss_kib);
        }
    }
}

#[derive(Debug)]
struct Lb {
    who: String,
    process: HostProcess,
    life: usize,
}

/// A term of some process, on the shared kernel clock (unix µs).
#[derive(Debug, Clone)]
struct TermRec {
    who: String,
    epoch: u64,
    from: u64,
    to: Option<u64>,
}

/// A host whose holding the VIP is excused: its process killed, frozen or
/// powered off, until restarted, powered on, or it removed the address.
#[derive(Debug, Clone, Copy)]
struct Excuse {
    lb: usize,
    from: Instant,
    until: Instant,
}

/// One injected fault.
#[derive(Debug, Clone)]
struct FaultRec {
    kind: Fault,
    victim: usize,
    at: Instant,
    wall: u64,
    /// How long it was held (frozen, off, unplugged, cut).
    held: Duration,
    /// Recovery done: the pair whole and steady again.
    recovered: Option<Instant>,
    note: String,
}

struct Soak<'a> {
    dc: &'a Datacenter,
    s: &'a Settings,
    seen: Arc<Seen>,
    lbs: [Option<Lb>; 2],
    generation: [usize; 2],
    /// Every term seen, by (who, epoch, from).
    terms: Mutex<BTreeMap<(String, u64, u64), Option<u64>>>,
    lives: Vec<Life>,
    excuses: Vec<Excuse>,
    faults: Vec<FaultRec>,
    violations: Vec<String>,
    notes: Vec<String>,
    restarts_damped: usize,
}

impl std::fmt::Debug for Soak<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Soak").field("faults", &self.faults.len()).finish()
    }
}

fn role(status: &Value) -> &str {
    status["ha"]["role"].as_str().unwrap_or("?")
}

impl<'a> Soak<'a> {
    fn config_path(&self, i: usize) -> PathBuf {
        self.s.out.join(format!("lb{i}.toml"))
    }

    fn write_configs(&self) -> Res<()> {
        let vip = self.dc.vip();
        for i in 1..=2 {
            let text = format!(
                "# halo-lb on lb{i} of the soak pair, as a user writes it: the admin API on\n\
                 # loopback, [ha] at its defaults (the probe address is the one the host's\n\
                 # agent advertises), a floating VIP, backends from the catalog.\n\
                 drain_timeout = \"2s\"\n\n[admin]\nlisten = \"{ADMIN}\"\n\n[consul]\naddress = \"{}\"\n\n\
                 [ha]\ncluster = \"soak\"\nid = \"lb{i}\"\nvip_address = \"{vip}/{PREFIX_LEN}\"\nvip_interface = \"{INTERFACE}\"\n\n\
                 [[vip]]\nname = \"echo\"\nlisten = \"{vip}:{VIP_PORT}\"\nservice = \"echo\"\nconnect_timeout = \"1s\"\n",
                self.dc.agent_url()
            );
            std::fs::write(self.config_path(i), text).map_err(|e| format!("write lb{i}.toml: {e}"))?;
        }
        Ok(())
    }

    fn start_backends(&self) -> Res<Vec<HostProcess>> {
        let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut procs = Vec::new();
        for i in 1..=BACKENDS {
            let name = format!("backend{i}");
            let host = self.dc.backend(i);
            let ip = host.ip();
            let mut echo = host.command(&me);
            echo.args(["echo", &format!("{ip}:{ECHO_PORT}")]);
            procs.push(host.spawn_logged(echo, &self.s.out.join(format!("{name}-echo.log"))));
            let config = self.s.out.join(format!("{name}-sidecar.toml"));
            std::fs::write(
                &config,
                format!(
                    "[consul]\naddress = \"{}\"\n\n[service]\nname = \"echo\"\nid = \"echo-{name}\"\naddress = \"{ip}\"\nport = {ECHO_PORT}\n\n\
                     [[check]]\nname = \"tcp\"\ntype = \"tcp\"\naddress = \"{ip}:{ECHO_PORT}\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\nrise = 1\n\n\
                     [admin]\nlisten = \"{ip}:{SIDECAR_PORT}\"\n\n[drain]\ngrace = \"1s\"\n",
                    self.dc.agent_url()
                ),
            )
            .map_err(|e| format!("write {}: {e}", config.display()))?;
            let mut sidecar = host.command(&self.s.halo_sidecar);
            sidecar.arg("--config").arg(&config).env("NO_COLOR", "1");
            procs.push(host.spawn_logged(sidecar, &self.s.out.join(format!("{name}-sidecar.log"))));
        }
        Ok(procs)
    }

    fn who(&self, i: usize) -> String {
        format!("lb{i}#{}", self.generation[i - 1])
    }

    /// Starts halo-lb on `lb<i>` (nothing may run there).
    fn launch(&mut self, i: usize) {
        assert!(self.lbs[i - 1].is_none(), "halo-lb already runs on lb{i}");
        self.generation[i - 1] += 1;
        let who = self.who(i);
        let host = self.dc.lb(i);
        let mut cmd = host.command(&self.s.halo_lb);
        cmd.arg("--config")
            .arg(self.config_path(i))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1");
        let process = host.spawn_logged(cmd, &self.s.out.join(format!("{}.log", who.replace('#', "-"))));
        self.lives.push(Life {
            who: who.clone(),
            born: Instant::now(),
            died: None,
            start: None,
            end: None,
            peak: None,
            how: "alive at the end",
        });
        self.lbs[i - 1] = Some(Lb {
            who,
            process,
            life: self.lives.len() - 1,
        });
    }

    /// `/status` of `lb<i>`'s instance, asked from inside its host; its
    /// terms are merged into the record on the way.
    async fn status(&self, i: usize) -> Option<Value> {
        let lb = self.lbs[i - 1].as_ref()?;
        let stream = self.dc.lb(i).connect(ADMIN).await.ok()?;
        let (code, body) = halo_testkit::http::request_over(stream, ADMIN, "GET", "/status").await?;
        if code != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        let mut terms = self.terms.lock().unwrap_or_else(PoisonError::into_inner);
        for t in v["ha"]["terms"].as_array().into_iter().flatten() {
            let (Some(epoch), Some(from)) = (t["epoch"].as_u64(), t["from_unix_us"].as_u64()) else {
                continue;
            };
            terms.insert((lb.who.clone(), epoch, from), t["to_unix_us"].as_u64());
        }
        Some(v)
    }

    async fn metrics(&self, i: usize) -> Option<String> {
        let stream = self.dc.lb(i).connect(ADMIN).await.ok()?;
        let (code, body) = halo_testkit::http::request_over(stream, ADMIN, "GET", "/metrics").await?;
        (code == 200).then_some(body)
    }

    /// Closes the open terms of a process that died at `wall`.
    fn close_terms(&self, who: &str, wall: u64) {
        let mut terms = self.terms.lock().unwrap_or_else(PoisonError::into_inner);
        for ((w, _, _), to) in terms.iter_mut() {
            if w == who && to.is_none() {
                *to = Some(wall);
            }
        }
    }

    /// Takes `lb<i>`'s process out of the pair after reading its terms and
    /// figures; `end` does the deed (kill, power-off, SIGTERM) and returns
    /// the wall clock at which it stopped serving.
    async fn retire(&mut self, i: usize, how: &'static str, end: impl FnOnce(&mut Lb, &Datacenter)) -> Res<()> {
        if self.status(i).await.is_none() {
            self.notes.push(format!(
                "{}'s /status did not answer before it was {how}: its last term may end early",
                self.who(i)
            ));
        }
        let mut lb = self.lbs[i - 1]
            .take()
            .ok_or_else(|| format!("no halo-lb runs on lb{i}"))?;
        let stat = proc_stat(lb.process.pid());
        let wall = unix_us();
        end(&mut lb, self.dc);
        lb.process.kill();
        self.close_terms(&lb.who, wall);
        let life = &mut self.lives[lb.life];
        life.end = stat;
        life.saw(stat);
        life.died = Some(Instant::now());
        life.how = how;
        Ok(())
    }

    async fn wait<T, F, Fut>(&self, what: &str, limit: Duration, mut f: F) -> Res<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f().await {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(format!("{what}: not within {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_role(&self, i: usize, want: &str) -> Res<Value> {
        self.wait(&format!("lb{i} to be {want}"), READY, || async {
            let s = self.status(i).await?;
            (role(&s) == want).then_some(s)
        })
        .await
    }

    async fn wait_table(&self, i: usize) -> Res<()> {
        self.wait(&format!("lb{i}'s table to have every backend"), READY, || async {
            let s = self.status(i).await?;
            (s["vips"][0]["backends"].as_array()?.len() == BACKENDS).then_some(())
        })
        .await
    }

    async fn served_after(&self, t: Instant) -> Res<()> {
        self.wait("the client to be served again", READY, || async {
            self.seen.served_after(t).then_some(())
        })
        .await
    }

    /// The active: exactly one instance says so.
    async fn active(&self) -> Res<usize> {
        self.wait("one active balancer", READY, || async {
            let mut active = Vec::new();
            for i in 1..=2 {
                if self.lbs[i - 1].is_some() && role(&self.status(i).await?) == "active" {
                    active.push(i);
                }
            }
            (active.len() == 1).then(|| active[0])
        })
        .await
    }

    /// Samples a process's figures: its start the first time (it is
    /// ready), its peak every time.
    fn sample_proc(&mut self, i: usize) {
        if let Some(lb) = &self.lbs[i - 1] {
            let stat = proc_stat(lb.process.pid());
            let life = &mut self.lives[lb.life];
            if life.start.is_none() {
                life.start = stat;
            }
            life.saw(stat);
        }
    }

    fn holds_vip(&self, i: usize) -> bool {
        self.dc.lb(i).addresses().contains(&self.dc.vip())
    }

    /// What a service manager runs after halo-lb exited (the packaged
    /// unit's ExecStopPost): `halo-lb release-vip`.
    fn release_vip(&mut self, i: usize) {
        let out = self
            .dc
            .lb(i)
            .command(&self.s.halo_lb)
            .arg("--config")
            .arg(self.config_path(i))
            .arg("release-vip")
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => self.notes.push(format!(
                "release-vip on lb{i} failed: {}{}",
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => self.notes.push(format!("release-vip on lb{i}: {e}")),
        }
    }

    /// Restarts a standby gracefully (SIGTERM, then a new process).
    async fn restart_standby(&mut self, i: usize) -> Res<()> {
        self.retire(i, "restarted (SIGTERM)", |lb, _| {
            if let Err(e) = lb.process.signal(Signal::SIGTERM) {
                log(&format!("SIGTERM {}: {e}", lb.who));
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while lb.process.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await?;
        self.launch(i);
        self.wait_role(i, "standby").await?;
        Ok(())
    }

    /// The pair whole again: both running, one active and one standby that
    /// is not damped (a damped one is restarted: its forced takeovers would
    /// wait for Consul's own detection, which is what the cut-apart tests
    /// are about, not the next fault), both tables full, the client served
    /// steadily; then [`Settings::quiet`].
    async fn make_whole(&mut self) -> Res<()> {
        for i in 1..=2 {
            if self.lbs[i - 1].as_mut().is_some_and(|lb| !lb.process.is_running()) {
                let who = self.who(i);
                self.violations.push(format!("{who} exited by itself"));
                self.retire(i, "exited by itself", |_, _| {}).await?;
            }
            if self.lbs[i - 1].is_none() {
                self.launch(i);
            }
        }
        let a = self.active().await?;
        let s = other(a);
        let st = self.wait_role(s, "standby").await?;
        let d = &st["ha"]["detector"];
        if !d["damped_for_ms"].is_null() || d["damped_until_heard"] == true {
            log(&format!("lb{s} is damped ({d}); restarting it"));
            self.restarts_damped += 1;
            self.restart_standby(s).await?;
        }
        for i in 1..=2 {
            self.wait_table(i).await?;
            self.sample_proc(i);
        }
        self.wait("steady answers", READY, || async { self.seen.steady().then_some(()) })
            .await?;
        tokio::time::sleep(self.s.quiet).await;
        Ok(())
    }

    /// Injects `kind` against the active and recovers.
    async fn fault(&mut self, kind: Fault, rng: &mut fastrand::Rng) -> Res<()> {
        let a = self.active().await?;
        let s = other(a);
        let host = format!("lb{a}");
        // Hold times are drawn for every kind so that a seed names one
        // sequence whatever the kinds do.
        let hold = Duration::from_millis(rng.u64(2000..=6000));
        let freeze = Duration::from_millis(rng.u64(2000..=4000));
        let mut rec = FaultRec {
            kind,
            victim: a,
            at: Instant::now(),
            wall: unix_us(),
            held: Duration::ZERO,
            recovered: None,
            note: String::new(),
        };
        log(&format!(
            "fault {}: {} (lb{a} active)",
            self.faults.len() + 1,
            kind.describe()
        ));
        match kind {
            Fault::Kill => {
                rec.at = Instant::now();
                rec.wall = unix_us();
                self.retire(a, "killed (SIGKILL)", |lb, _| lb.process.kill()).await?;
                self.release_vip(a);
                self.wait_role(s, "active").await?;
                self.served_after(rec.at).await?;
                self.launch(a);
                self.wait_role(a, "standby").await?;
                if self.holds_vip(a) {
                    self.violations
                        .push(format!("the restarted lb{a} holds the VIP as a standby"));
                }
                self.excuses.push(Excuse {
                    lb: a,
                    from: rec.at,
                    until: Instant::now(),
                });
            }
            Fault::Sigstop => {
                rec.held = freeze;
                let lb = self.lbs[a - 1].as_mut().ok_or("no active process")?;
                lb.process.pause();
                self.wait_role(s, "active").await?;
                self.served_after(rec.at).await?;
                tokio::time::sleep(freeze.saturating_sub(rec.at.elapsed())).await;
                let lb = self.lbs[a - 1].as_mut().ok_or("no active process")?;
                lb.process.resume();
                let thawed = Instant::now();
                self.wait("the woken instance to remove the VIP", READY, || async {
                    (!self.holds_vip(a)).then_some(())
                })
                .await?;
                rec.note = format!("removed the VIP {} after SIGCONT", ms(thawed.elapsed()));
                self.excuses.push(Excuse {
                    lb: a,
                    from: rec.at,
                    until: Instant::now(),
                });
                self.wait_role(a, "standby").await?;
            }
            Fault::PowerOff => {
                rec.held = hold;
                rec.at = Instant::now();
                rec.wall = unix_us();
                self.retire(a, "powered off", |_, dc| dc.power_off(&format!("lb{a}")))
                    .await?;
                self.wait_role(s, "active").await?;
                self.served_after(rec.at).await?;
                tokio::time::sleep(hold.saturating_sub(rec.at.elapsed())).await;
                self.dc.power_on(&host).await;
                self.excuses.push(Excuse {
                    lb: a,
                    from: rec.at,
                    until: Instant::now(),
                });
                self.launch(a);
                self.wait_role(a, "standby").await?;
            }
            Fault::Cable => {
                rec.held = hold;
                self.dc.unplug(&host);
                self.wait_role(s, "active").await?;
                self.served_after(rec.at).await?;
                let cut_off = self
                    .wait("the cut-off active to stop serving", READY, || async {
                        let st = self.status(a).await?;
                        (role(&st) != "active").then_some(())
                    })
                    .await;
                if let Err(e) = cut_off {
                    self.violations.push(format!("cable pull of lb{a}: {e}"));
                }
                rec.note = format!("the cut-off lb{a} stopped serving after {}", ms(rec.at.elapsed()));
                tokio::time::sleep(hold.saturating_sub(rec.at.elapsed())).await;
                let plugged = Instant::now();
                self.dc.plug(&host);
                // Its agent is a member again only after the servers retry
                // it (serf's reconnect interval, 30 s) or it pushes its state.
                self.wait_role(a, "standby").await?;
                let _infallible = write!(rec.note, "; standby again {} after the re-plug", ms(plugged.elapsed()));
            }
            Fault::CutApart => {
                rec.held = hold;
                self.dc.cut("lb1", "lb2");
                self.hold_watching(hold, rec.at).await;
                self.dc.heal("lb1", "lb2");
            }
            Fault::ProbeDrop => {
                rec.held = hold;
                self.dc.cut_udp("lb1", "lb2", PROBE_PORT);
                self.hold_watching(hold, rec.at).await;
                self.dc.heal_udp("lb1", "lb2", PROBE_PORT);
            }
            Fault::LeaderKill => {
                let old = self.dc.kill_leader().await;
                rec.note = format!("{old} was the leader");
                let dc = self.dc;
                let leader = self
                    .wait("a new Consul leader", READY, || async {
                        let l = dc.leader().await?;
                        (l != old).then_some(l)
                    })
                    .await?;
                let _infallible = write!(rec.note, "; {leader} leader after {}", ms(rec.at.elapsed()));
                self.served_after(Instant::now()).await?;
                self.dc.start_agent(&old).await;
            }
            Fault::ForgedIcmp => {
                rec.held = Duration::from_secs(3);
                let note = self.forge_icmp(a, s, rec.held).await?;
                rec.note = note;
            }
        }
        self.make_whole().await?;
        rec.recovered = Some(Instant::now());
        self.faults.push(rec);
        Ok(())
    }

    /// Holds a network fault for `hold`, polling both instances' status
    /// meanwhile (their terms are recorded as they go).
    async fn hold_watching(&self, hold: Duration, from: Instant) {
        while from.elapsed() < hold {
            for i in 1..=2 {
                self.status(i).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends forged ICMP port-unreachable messages, quoting the standby's
    /// probe socket, from the client host every 50 ms for `how_long`.
    async fn forge_icmp(&self, a: usize, s: usize, how_long: Duration) -> Res<String> {
        let active = self.status(a).await.ok_or("the active's /status")?;
        let probe: std::net::SocketAddrV4 = active["ha"]["probe"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("no IPv4 probe address in {}", active["ha"]))?;
        let netns = self.dc.lb(s).netns().to_owned();
        let port = self
            .wait("the standby's probe socket", Duration::from_secs(10), || async {
                halo_testkit::forge::connected_udp_port(&netns, "halo-lb", probe.into())
            })
            .await?;
        let before = metric(&self.metrics(s).await.unwrap_or_default(), UNCORROBORATED);
        let victim_ip = self.dc.lb(s).ip();
        let icmp = halo_testkit::forge::icmp_port_unreachable(victim_ip, port, probe);
        let victim = SocketAddr::from((victim_ip, 0));
        let sent = self
            .dc
            .client()
            .within(move || {
                use socket2::{Domain, Protocol, Socket, Type};
                let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
                let start = Instant::now();
                let mut sent = 0u32;
                while start.elapsed() < how_long {
                    raw.send_to(&icmp, &victim.into())?;
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(sent)
            })
            .map_err(|e| format!("send the forged ICMP messages: {e}"))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = metric(&self.metrics(s).await.unwrap_or_default(), UNCORROBORATED);
        Ok(format!(
            "{sent} sent quoting lb{s}'s port {port}; {} counted uncorroborated",
            after.saturating_sub(before)
        ))
    }
}

const UNCORROBORATED: &str = "halo_ha_probe_refusals_uncorroborated_total";

/// A counter's value in a Prometheus text page (0 when absent).
fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

// ----------------------------------------------------------------- checker

/// The client's gap around a fault at `from`: the longest time between the
/// starts of two successive successful connections, from the last success
/// before `from` through the successes started in `[from, to)`.
fn gap(attempts: &[Attempt], from: Instant, to: Instant) -> Option<Duration> {
    let mut prev = attempts
        .iter()
        .filter(|p| p.ok && p.at < from)
        .map(|p| p.at)
        .next_back()?;
    let mut worst = None;
    for p in attempts.iter().filter(|p| p.ok && p.at >= from && p.at < to) {
        worst = Some(worst.unwrap_or(Duration::ZERO).max(p.at - prev));
        prev = p.at;
    }
    worst
}

/// Pairs of terms of different processes that overlap or share an epoch.
fn overlaps(terms: &[TermRec], end: u64) -> Vec<String> {
    let mut bad = Vec::new();
    for (n, a) in terms.iter().enumerate() {
        for b in &terms[n + 1..] {
            if a.who == b.who {
                continue;
            }
            let (a_to, b_to) = (a.to.unwrap_or(end), b.to.unwrap_or(end));
            if a_to > b.from && b_to > a.from {
                bad.push(format!(
                    "two actives at once: {a:?} and {b:?} overlap by {} ms",
                    (a_to.min(b_to) - a.from.max(b.from)) / 1000
                ));
            }
            if a.epoch == b.epoch {
                bad.push(format!("two processes with one epoch: {a:?} {b:?}"));
            }
        }
    }
    bad
}

/// Handovers (a term of another process than the term before it) that
/// started in `[from, to)`, unix µs.
fn handovers(terms: &[TermRec], from: u64, to: u64) -> usize {
    terms
        .windows(2)
        .filter(|w| w[0].who != w[1].who && w[1].from >= from && w[1].from < to)
        .count()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `N (how: n, …)`.
fn render_breaks(breaks: &[Break]) -> String {
    let mut by: BTreeMap<Break, usize> = BTreeMap::new();
    for b in breaks {
        *by.entry(*b).or_default() += 1;
    }
    if by.is_empty() {
        return "0".into();
    }
    let parts: Vec<String> = by.iter().map(|(b, n)| format!("{}: {n}", b.key())).collect();
    format!("{} ({})", breaks.len(), parts.join(", "))
}

fn render_stat(s: Option<ProcStat>) -> String {
    s.map_or("-".into(), |s| {
        format!("{} fds, {:.1} MiB", s.fds, s.rss_kib as f64 / 1024.0)
    })
}

// -------------------------------------------------------------------- main

async fn soak(
    dc: &Datacenter,
    s: &Settings,
    soak: &mut Soak<'_>,
    sampler_out: &mut Option<Sampler>,
    backends: &mut Vec<HostProcess>,
) -> Res<()> {
    soak.write_configs()?;
    *backends = soak.start_backends()?;
    soak.wait("every backend passing in the catalog", READY, || async {
        let passing = dc.get_json("client", "/v1/health/service/echo?passing").await?;
        (passing.as_array()?.len() == BACKENDS).then_some(())
    })
    .await?;
    soak.launch(1);
    soak.wait_role(1, "active").await?;
    soak.launch(2);
    soak.wait_role(2, "standby").await?;
    *sampler_out = Some(Sampler::start(dc));
    soak.make_whole().await?;
    log(&format!(
        "pair ready; soaking for {} s, seed {} (SOAK_SEED={} reproduces the faults' order and hold times)",
        s.seconds, s.seed, s.seed
    ));
    let mut rng = fastrand::Rng::with_seed(s.seed);
    let end = started() + Duration::from_secs(s.seconds);
    let mut cycle: Vec<Fault> = Vec::new();
    while Instant::now() + TAIL < end {
        if cycle.is_empty() {
            cycle = s.faults.clone();
            rng.shuffle(&mut cycle);
            cycle.reverse();
        }
        let kind = cycle.pop().ok_or("no faults enabled")?;
        soak.fault(kind, &mut rng).await?;
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("echo") {
        return match args.get(2) {
            Some(addr) => echo_main(addr),
            None => {
                eprintln!("usage: soak echo <ip:port>");
                ExitCode::FAILURE
            }
        };
    }
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(run()),
        Err(e) => {
            eprintln!("soak: tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    started();
    let s = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !halo_testkit::netns::required("soak") {
        eprintln!("soak: set HALO_NETNS_TESTS=1 and run as root");
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::create_dir_all(&s.out) {
        eprintln!("soak: create {}: {e}", s.out.display());
        return ExitCode::FAILURE;
    }
    let spec = DcSpec {
        balancers: 2,
        backends: BACKENDS,
        raft_multiplier: Some(1),
        ..DcSpec::default()
    };
    let desc = spec.describe();
    log(&format!(
        "seed {} (SOAK_SEED); {} s; faults {}; starting the datacenter ({desc})",
        s.seed,
        s.seconds,
        s.faults.iter().map(|f| f.key()).collect::<Vec<_>>().join(",")
    ));
    let dc = Datacenter::start(spec).await;
    log(&format!("datacenter ready after {:?}", dc.startup().ready));
    let vip = SocketAddr::from((dc.vip(), VIP_PORT));
    let clients = Clients::start(dc.client().netns(), vip, &s);
    let mut st = Soak {
        dc: &dc,
        s: &s,
        seen: Arc::clone(&clients.seen),
        lbs: [None, None],
        generation: [0, 0],
        terms: Mutex::default(),
        lives: Vec::new(),
        excuses: Vec::new(),
        faults: Vec::new(),
        violations: Vec::new(),
        notes: Vec::new(),
        restarts_damped: 0,
    };
    let mut sampler = None;
    // Kept until the clients have stopped, so no stream breaks at the end.
    let mut backends = Vec::new();
    let mut interrupted = None;
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("soak: cannot handle SIGTERM: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::select! {
            r = soak(&dc, &s, &mut st, &mut sampler, &mut backends) => if let Err(e) = r {
                log(&format!("stopped: {e}"));
                st.violations.push(format!("the run stopped: {e}"));
            },
            _ = tokio::signal::ctrl_c() => interrupted = Some("SIGINT"),
            _ = term.recv() => interrupted = Some("SIGTERM"),
        }
    }
    if let Some(sig) = interrupted {
        st.violations.push(format!("interrupted by {sig}"));
    }
    // Whatever is still frozen would not answer: thaw it.
    for lb in st.lbs.iter_mut().flatten() {
        if let Err(e) = lb.process.signal(Signal::SIGCONT) {
            log(&format!("SIGCONT {}: {e}", lb.who));
        }
    }
    // The final terms and figures of the live processes.
    for i in 1..=2 {
        st.status(i).await;
        if let Some(lb) = &st.lbs[i - 1] {
            let stat = proc_stat(lb.process.pid());
            st.lives[lb.life].end = stat;
            st.lives[lb.life].saw(stat);
        }
    }
    let end_wall = unix_us();
    let ended = Instant::now();
    let samples = sampler.map(Sampler::stop).unwrap_or_default();
    let seen = clients.stop();
    drop(backends);
    let table = check_and_render(&st, &seen, &samples, ended, end_wall, &desc);
    print!("{table}");
    if let Err(e) = std::fs::write(s.out.join("summary.md"), &table) {
        eprintln!("soak: write summary.md: {e}");
    }
    for host in [
        "server1", "server2", "server3", "client", "lb1", "lb2", "backend1", "backend2",
    ] {
        if let Err(e) = std::fs::copy(dc.agent_log(host), s.out.join(format!("consul-{host}.log"))) {
            log(&format!("cannot keep the agent log of {host}: {e}"));
        }
    }
    let failed = table.contains("\n**FAILED**");
    drop(st);
    drop(dc);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs every check and renders the table; the table ends with a
/// `**FAILED**` line listing the violations if there are any.
fn check_and_render(
    st: &Soak<'_>,
    seen: &Seen,
    samples: &[(Instant, [bool; 2])],
    ended: Instant,
    end_wall: u64,
    desc: &str,
) -> String {
    let s = st.s;
    let mut violations = st.violations.clone();
    let mut attempts = seen.attempts().clone();
    // Pushed as they end; the gaps want them by start.
    attempts.sort_by_key(|a| a.at);
    let corruptions = seen.corruptions.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let breaks = seen.breaks.lock().unwrap_or_else(PoisonError::into_inner).clone();

    // Terms.
    let mut terms: Vec<TermRec> = st
        .terms
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|((who, epoch, from), to)| TermRec {
            who: who.clone(),
            epoch: *epoch,
            from: *from,
            to: *to,
        })
        .collect();
    terms.sort_by_key(|t| t.from);
    let overlapping = overlaps(&terms, end_wall);
    violations.extend(overlapping.iter().cloned());

    // VIP holders.
    let mut two = 0usize;
    let mut excused = 0usize;
    for (at, h) in samples {
        if h[0] && h[1] {
            let counted = (1..=2)
                .filter(|lb| {
                    !st.excuses
                        .iter()
                        .any(|e| e.lb == *lb && e.from <= *at && *at <= e.until)
                })
                .count();
            if counted > 1 {
                two += 1;
                if two <= 5 {
                    violations.push(format!(
                        "two hosts hold the VIP at +{:.2} s",
                        at.duration_since(started()).as_secs_f64()
                    ));
                }
            } else {
                excused += 1;
            }
        }
    }
    if two > 5 {
        violations.push(format!("… {two} samples with two holders in all"));
    }

    // Gaps, handovers and breaks per fault.
    #[derive(Default)]
    struct PerKind {
        gaps: Vec<Duration>,
        handovers: Vec<usize>,
        breaks: Vec<Break>,
    }
    let mut per: BTreeMap<Fault, PerKind> = BTreeMap::new();
    let mut detail = String::new();
    for (n, f) in st.faults.iter().enumerate() {
        let until = st.faults.get(n + 1).map_or(ended, |g| g.at);
        let until_wall = st.faults.get(n + 1).map_or(end_wall, |g| g.wall);
        let g = gap(&attempts, f.at, until);
        let h = handovers(&terms, f.wall, until_wall);
        let in_window: Vec<Break> = breaks
            .iter()
            .filter(|(t, _)| *t + BREAK_SLACK >= f.at && *t + BREAK_SLACK < until)
            .map(|(_, how)| *how)
            .collect();
        let b = in_window.len();
        let p = per.entry(f.kind).or_default();
        match g {
            Some(g) => {
                p.gaps.push(g);
                if g > f.kind.bound() {
                    violations.push(format!(
                        "fault {} ({}, lb{} active): client gap {} beyond its bound {}",
                        n + 1,
                        f.kind.key(),
                        f.victim,
                        ms(g),
                        ms(f.kind.bound())
                    ));
                }
            }
            None => violations.push(format!(
                "fault {} ({}): the client was never served after it",
                n + 1,
                f.kind.key()
            )),
        }
        if f.kind == Fault::ForgedIcmp && b > 0 {
            violations.push(format!(
                "fault {} (forged-icmp): {b} stream(s) broke without a handover",
                n + 1
            ));
        }
        if let Some(max) = f.kind.max_handovers() {
            if h > max {
                violations.push(format!(
                    "fault {} ({}): {h} handovers, at most {max} allowed",
                    n + 1,
                    f.kind.key()
                ));
            }
        }
        p.handovers.push(h);
        p.breaks.extend(in_window);
        let _infallible = writeln!(
            detail,
            "{:>3}. +{:>7.1} s {:<12} lb{} active; held {}; gap {}; {h} handover(s); {b} stream break(s); recovered after {}{}{}",
            n + 1,
            f.at.duration_since(started()).as_secs_f64(),
            f.kind.key(),
            f.victim,
            ms(f.held),
            g.map_or("-".into(), ms),
            f.recovered.map_or("-".into(), |r| ms(r - f.at)),
            if f.note.is_empty() { "" } else { "; " },
            f.note
        );
    }
    let first = st.faults.first().map_or(ended, |f| f.at);
    let steady_breaks = breaks.iter().filter(|(t, _)| *t + BREAK_SLACK < first).count();

    // Descriptors and RSS.
    let mut lives = String::new();
    for l in &st.lives {
        if let (Some(a), Some(b)) = (l.start, l.end) {
            if b.fds > a.fds + FD_GROWTH {
                violations.push(format!("{}: descriptors grew {} → {}", l.who, a.fds, b.fds));
            }
            if b.rss_kib > a.rss_kib + RSS_GROWTH_KIB {
                violations.push(format!("{}: RSS grew {} → {} KiB", l.who, a.rss_kib, b.rss_kib));
            }
        }
        let _infallible = writeln!(
            lives,
            "| {} | {:.0} s | {} | {} | {} | {} |",
            l.who,
            l.died.unwrap_or(ended).duration_since(l.born).as_secs_f64(),
            render_stat(l.start),
            render_stat(l.end),
            render_stat(l.peak),
            l.how
        );
    }
    violations.extend(corruptions.iter().take(10).cloned());
    if corruptions.len() > 10 {
        violations.push(format!("… {} corruptions in all", corruptions.len()));
    }

    let mut out = String::new();
    let ok_conns = attempts.iter().filter(|a| a.ok).count();
    let _infallible = writeln!(
        out,
        "## Soak: {} s, seed {}, {} faults\n",
        s.seconds,
        s.seed,
        st.faults.len()
    );
    let _infallible = writeln!(
        out,
        "| fault | count | client gap p50 | gap max | bound | handovers (max) | streams broken |\n|---|---|---|---|---|---|---|"
    );
    for (kind, p) in &per {
        let mut g = p.gaps.clone();
        g.sort();
        let _infallible = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {}{} | {} |",
            kind.describe(),
            p.handovers.len(),
            ms(percentile(&g, 0.5)),
            ms(g.last().copied().unwrap_or_default()),
            ms(kind.bound()),
            p.handovers.iter().max().copied().unwrap_or(0),
            kind.max_handovers().map_or(String::new(), |m| format!(" (≤ {m})")),
            render_breaks(&p.breaks)
        );
    }
    let _infallible = writeln!(
        out,
        "\n| check | figure |\n|---|---|\n\
         | overlapping active terms | {} (of {} terms, {} processes) |\n\
         | samples with two VIP holders | {two} (of {}; {excused} excused: a killed, frozen or powered-off host's leftover) |\n\
         | new connections | {} ok, {} failed (of {}, {} per second) |\n\
         | corrupted answers / stream bytes | {} |\n\
         | bytes checked end to end | {} in streams, {} in new connections |\n\
         | streams opened / broken | {} / {} ({} before the first fault) |\n\
         | damped standbys restarted in recovery | {} |",
        overlapping.len(),
        terms.len(),
        st.lives.len(),
        samples.len(),
        ok_conns,
        attempts.len() - ok_conns,
        attempts.len(),
        s.rate,
        corruptions.len(),
        seen.stream_bytes.load(Ordering::Relaxed),
        seen.conn_bytes.load(Ordering::Relaxed),
        seen.stream_opens.load(Ordering::Relaxed),
        breaks.len(),
        steady_breaks,
        st.restarts_damped
    );
    let _infallible = writeln!(
        out,
        "\n| halo-lb process | life | start (ready) | end | peak | ended |\n|---|---|---|---|---|---|\n{lives}"
    );
    let _infallible = writeln!(out, "Faults in order:\n\n```\n{detail}```\n");
    for n in &st.notes {
        let _infallible = writeln!(out, "Note: {n}");
    }
    let _infallible = writeln!(
        out,
        "\nRun by benches/soak.sh; halo-lb {}; Consul timing: {desc}; halo [ha] defaults; {} streams; bounds: fds +{FD_GROWTH}, RSS +{} MiB over a process's life. Raw output: {}.",
        s.halo_commit,
        s.streams,
        RSS_GROWTH_KIB / 1024,
        s.out.display()
    );
    if violations.is_empty() {
        let _infallible = writeln!(out, "\nPASSED: no violation.");
    } else {
        let _infallible = writeln!(out, "\n**FAILED**: {} violation(s):", violations.len());
        for v in &violations {
            let _infallible = writeln!(out, "- {v}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handovers_count_changes_of_process_only() {
        let t = |who: &str, from: u64| TermRec {
            who: who.into(),
            epoch: from,
            from,
            to: Some(from + 5),
        };
        let terms = [t("lb1#1", 0), t("lb1#1", 10), t("lb2#1", 20), t("lb1#2", 30)];
        assert_eq!(handovers(&terms, 5, 100), 2);
        assert_eq!(handovers(&terms, 5, 25), 1);
        assert_eq!(handovers(&terms, 0, 15), 0, "a new term of the same process");
    }

    #[test]
    fn overlaps_find_two_actives_and_shared_epochs() {
        let t = |who: &str, epoch: u64, from: u64, to: Option<u64>| TermRec {
            who: who.into(),
            epoch,
            from,
            to,
        };
        assert!(overlaps(&[t("a", 1, 0, Some(10)), t("b", 2, 10, None)], 20).is_empty());
        assert_eq!(overlaps(&[t("a", 1, 0, None), t("b", 2, 10, Some(12))], 20).len(), 1);
        assert_eq!(overlaps(&[t("a", 1, 0, Some(5)), t("b", 1, 10, Some(12))], 20).len(), 1);
    }

    #[test]
    fn gap_is_the_longest_run_between_successes() {
        let t0 = Instant::now();
        let a = |ms: u64, ok: bool| Attempt {
            at: t0 + Duration::from_millis(ms),
            ok,
        };
        let attempts = [
            a(0, true),
            a(10, true),
            a(20, false),
            a(200, false),
            a(410, true),
            a(420, true),
        ];
        let g = gap(
            &attempts,
            t0 + Duration::from_millis(15),
            t0 + Duration::from_millis(500),
        );
        assert_eq!(g, Some(Duration::from_millis(400)));
    }
}
