//! The failover benchmark in the production-shaped datacenter
//! (`halo_testkit::dc`): three Consul servers, a client agent on every
//! other host, two balancer hosts, a backend host and a client host, in
//! network namespaces on 198.18.0.0/15.
//!
//! For each system (the halo-lb pair with its default `[ha]` settings,
//! keepalived VRRP with `advert_int 1`, `consul lock` with its defaults) and
//! each event (kill -9 of the active process, power-off of the active host,
//! cable pull of the active host) it measures, over rounds, the longest gap
//! between two answers that a client on the client host sees
//! (`failover.py probe`: a TCP connection to the VIP every 5 ms), and
//! counts samples (every [`SAMPLE_EVERY`]) in which both balancer hosts
//! held the VIP on an interface that is powered. Run through
//! `benches/failover.sh`, which builds halo-lb, installs keepalived and
//! passes everything in the environment (see [`Settings::from_env`]); see
//! benches/README.md ("Failover").
//!
//! Every process it starts runs in a host of the datacenter and is killed
//! by pid when its guard drops; the datacenter removes the namespaces and
//! everything left in them on drop, also when this binary is interrupted
//! (SIGINT, SIGTERM) or a step fails.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use halo_testkit::dc::{Datacenter, DcSpec};
use halo_testkit::netns::{HostProcess, INTERFACE, PREFIX_LEN};
use nix::sys::signal::{killpg, Signal};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;

/// How often the VIP holders are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// The port every system serves on the VIP.
const VIP_PORT: u16 = 7000;
/// halo-lb's admin address inside each balancer host.
const ADMIN: &str = "127.0.0.1:9901";
/// The greeting backends of the halo pair, on the backend host: lb1's, lb2's.
const BACKEND_PORTS: [u16; 2] = [7001, 7002];
/// A client attempt's deadline (failover.py's PROBE_DEADLINE).
const PROBE_DEADLINE: Duration = Duration::from_secs(1);
/// Longest wait for a role, a restart, a re-join.
const READY: Duration = Duration::from_secs(90);
/// How long one balancer must have answered alone before a round starts.
const SETTLED: Duration = Duration::from_secs(2);
const BALANCERS: [&str; 2] = ["lb1", "lb2"];

type Res<T> = Result<T, String>;

/// CLOCK_MONOTONIC in ns: the clock the probe's log uses.
fn mono_ns() -> i64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always readable");
    t.tv_sec() * 1_000_000_000 + t.tv_nsec()
}

fn log(msg: &str) {
    eprintln!("[failover-dc {:>7.1}s] {msg}", started().elapsed().as_secs_f64());
}

fn started() -> Instant {
    static T: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T.get_or_init(Instant::now)
}

fn other(host: &str) -> &'static str {
    if host == "lb1" {
        "lb2"
    } else {
        "lb1"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    Halo,
    Keepalived,
    ConsulLock,
}

impl System {
    fn key(self) -> &'static str {
        match self {
            System::Halo => "halo",
            System::Keepalived => "keepalived",
            System::ConsulLock => "consul-lock",
        }
    }
    fn label(self) -> &'static str {
        match self {
            System::Halo => "halo-lb pair ([ha] defaults: check_ttl 1s, lock_delay 300ms, probe 100ms × 3)",
            System::Keepalived => "keepalived VRRP (`advert_int 1`, unicast)",
            System::ConsulLock => "`consul lock` (defaults: session TTL 15s, lock-delay 15s)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Kill,
    PowerOff,
    Cable,
}

impl Event {
    fn key(self) -> &'static str {
        match self {
            Event::Kill => "kill",
            Event::PowerOff => "power-off",
            Event::Cable => "cable",
        }
    }
    fn label(self, system: System) -> &'static str {
        match (self, system) {
            (Event::Kill, System::Halo) => "kill -9 of the active halo-lb",
            (Event::Kill, System::Keepalived) => "kill -9 of the master's keepalived + server",
            (Event::Kill, System::ConsulLock) => "kill -9 of the holder's `consul lock` + child",
            (Event::PowerOff, _) => "power-off of the active host",
            (Event::Cable, _) => "cable pull of the active host",
        }
    }
}

/// What failover.sh passes in the environment.
#[derive(Debug, Clone)]
struct Settings {
    halo_lb: PathBuf,
    halo_commit: String,
    python: String,
    failover_py: PathBuf,
    keepalived: Option<PathBuf>,
    keepalived_note: Option<String>,
    consul: PathBuf,
    out: PathBuf,
    table: Option<PathBuf>,
    systems: Vec<System>,
    events: Vec<Event>,
    rounds: usize,
    consul_rounds: usize,
    fault_seconds: u64,
    /// FAILOVER_CABLE_FRESH=1: after a cable round, restart the old
    /// active (now the standby), so the next round's standby carries no
    /// damping of forced takeovers from the round before.
    cable_fresh: bool,
    keepalived_rounds: usize,
    max_seconds: u64,
}

impl Settings {
    fn from_env() -> Res<Settings> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let need = |k: &str| var(k).ok_or_else(|| format!("{k} is not set (run benches/failover.sh)"));
        let num = |k: &str, d: u64| -> Res<u64> {
            var(k).map_or(Ok(d), |v| v.parse().map_err(|e| format!("{k}={v:?}: {e}")))
        };
        let mut systems = Vec::new();
        for s in var("FAILOVER_SYSTEMS")
            .unwrap_or_else(|| "halo,keepalived,consul-lock".into())
            .split(',')
        {
            systems.push(match s.trim() {
                "halo" => System::Halo,
                "keepalived" => System::Keepalived,
                "consul-lock" => System::ConsulLock,
                other => return Err(format!("FAILOVER_SYSTEMS: unknown system {other:?}")),
            });
        }
        let mut events = Vec::new();
        for e in var("FAILOVER_EVENTS")
            .unwrap_or_else(|| "kill,power-off,cable".into())
            .split(',')
        {
            events.push(match e.trim() {
                "kill" => Event::Kill,
                "power-off" => Event::PowerOff,
                "cable" => Event::Cable,
                other => return Err(format!("FAILOVER_EVENTS: unknown event {other:?}")),
            });
        }
        Ok(Settings {
            halo_lb: need("FAILOVER_HALO_LB")?.into(),
            halo_commit: var("FAILOVER_HALO_COMMIT").unwrap_or_else(|| "?".into()),
            python: need("FAILOVER_PYTHON")?,
            failover_py: need("FAILOVER_PY")?.into(),
            keepalived: var("FAILOVER_KEEPALIVED").map(PathBuf::from),
            keepalived_note: var("FAILOVER_KEEPALIVED_NOTE"),
            consul: halo_testkit::consul_binary(),
            out: need("FAILOVER_OUT")?.into(),
            table: var("FAILOVER_TABLE").map(PathBuf::from),
            systems,
            events,
            rounds: usize::try_from(num("FAILOVER_ROUNDS", 20)?).map_err(|e| e.to_string())?,
            consul_rounds: usize::try_from(num("FAILOVER_CONSUL_ROUNDS", 3)?).map_err(|e| e.to_string())?,
            fault_seconds: num("FAILOVER_FAULT_SECONDS", 10)?,
            cable_fresh: var("FAILOVER_CABLE_FRESH").as_deref() == Some("1"),
            keepalived_rounds: usize::try_from(num("FAILOVER_KEEPALIVED_ROUNDS", num("FAILOVER_ROUNDS", 20)?)?)
                .map_err(|e| e.to_string())?,
            max_seconds: num("FAILOVER_MAX_SECONDS", 3600)?,
        })
    }
}

// ------------------------------------------------------------------ probe log

/// The client's log (`<end ns> ok|fail <who> <start ns>` per attempt), read
/// as it grows.
#[derive(Debug)]
struct ProbeLog {
    path: PathBuf,
    pos: u64,
    rest: String,
    ok_t: Vec<i64>,
    ok_who: Vec<String>,
    fail_start: Vec<i64>,
    fail_end: Vec<i64>,
}

impl ProbeLog {
    fn new(path: PathBuf) -> ProbeLog {
        ProbeLog {
            path,
            pos: 0,
            rest: String::new(),
            ok_t: Vec::new(),
            ok_who: Vec::new(),
            fail_start: Vec::new(),
            fail_end: Vec::new(),
        }
    }

    fn poll(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        // At most 16 MiB per poll: the log grows by ~200 lines a second.
        match f.take(16 << 20).read_to_end(&mut buf) {
            Ok(n) => self.pos += n as u64,
            Err(e) => {
                log(&format!("cannot read {}: {e}", self.path.display()));
                return;
            }
        }
        let text = std::mem::take(&mut self.rest) + &String::from_utf8_lossy(&buf);
        let mut lines: Vec<&str> = text.split('\n').collect();
        self.rest = lines.pop().unwrap_or_default().to_owned();
        for line in lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [end, status, who, start] = parts[..] else { continue };
            let (Ok(end), Ok(start)) = (end.parse::<i64>(), start.parse::<i64>()) else {
                continue;
            };
            if status == "ok" {
                self.ok_t.push(end);
                self.ok_who.push(who.to_owned());
            } else {
                self.fail_end.push(end);
                self.fail_start.push(start);
            }
        }
    }

    fn last_who(&mut self) -> Option<String> {
        self.poll();
        self.ok_who.last().cloned()
    }

    /// Answers in the last 300 ms and no failure in the last 1.2 s.
    fn steady(&mut self) -> bool {
        self.poll();
        let now = mono_ns();
        let recent_ok = self.ok_t.last().is_some_and(|t| *t > now - 300_000_000);
        let recent_fail = self
            .fail_end
            .last()
            .is_some_and(|t| *t > now - (PROBE_DEADLINE.as_nanos() as i64 + 200_000_000));
        recent_ok && !recent_fail
    }

    /// When the host that answers now began answering (ns): the first of
    /// the unbroken run of its answers at the end of the log.
    fn answering_since(&mut self) -> Option<i64> {
        self.poll();
        let who = self.ok_who.last()?;
        let run = self.ok_who.iter().rev().take_while(|w| *w == who).count();
        Some(self.ok_t[self.ok_t.len() - run])
    }

    fn first_ok_after(&self, t: i64, who: &str) -> Option<usize> {
        let i = self.ok_t.partition_point(|x| *x <= t);
        (i..self.ok_t.len()).find(|j| self.ok_who[*j] == who)
    }

    /// Waits for an answer from `who` after `t_event`: the longest time
    /// between consecutive answers from the last one before the event to
    /// that one (ms), and when that answer came (ns).
    async fn gap(&mut self, t_event: i64, who: &str, timeout: Duration) -> Res<(f64, i64)> {
        let deadline = Instant::now() + timeout;
        let j = loop {
            self.poll();
            if let Some(j) = self.first_ok_after(t_event, who) {
                break j;
            }
            if Instant::now() > deadline {
                return Err(format!("no answer from {who} within {timeout:?} of the event"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let i = self.ok_t.partition_point(|x| *x <= t_event);
        if i == 0 {
            return Err("no answer before the event".into());
        }
        let times = &self.ok_t[i - 1..=j];
        let worst = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        Ok((worst as f64 / 1e6, self.ok_t[j]))
    }

    /// Failed attempts that started between `from` and `to` (call a probe
    /// deadline after `to`).
    fn fails_between(&mut self, from: i64, to: i64) -> usize {
        self.poll();
        self.fail_start.iter().filter(|t| **t > from && **t < to).count()
    }
}

// ------------------------------------------------------------------- sampler

/// Which balancer hosts hold the VIP, every [`SAMPLE_EVERY`]: `ip -4 addr`
/// of each balancer's `eth0`, ignoring a host while it is powered off.
/// (CLOCK_MONOTONIC ns, whether lb1 and lb2 held the VIP).
type Samples = Arc<Mutex<Vec<(i64, [bool; 2])>>>;

#[derive(Debug)]
struct Sampler {
    samples: Samples,
    powered: Arc<[AtomicBool; 2]>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(dc: &Datacenter, ip: PathBuf) -> Sampler {
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

    fn set_powered(&self, host: &str, on: bool) {
        self.powered[idx(host)].store(on, Ordering::SeqCst);
    }

    /// Samples taken in [from, to].
    fn between(&self, from: i64, to: i64) -> Vec<(i64, [bool; 2])> {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        s.iter().filter(|(t, _)| *t >= from && *t <= to).copied().collect()
    }

    fn holders_now(&self) -> Option<[bool; 2]> {
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

fn idx(host: &str) -> usize {
    BALANCERS.iter().position(|h| *h == host).expect("a balancer host")
}

// ------------------------------------------------------------------ rounds

#[derive(Debug, Clone)]
struct Row {
    from: String,
    gap_ms: f64,
    failed: usize,
    samples: usize,
    two_holders: usize,
    /// Cable: ms from the pull until the cut-off host no longer held the
    /// VIP (None: it kept it until re-plugged).
    old_dropped_ms: Option<f64>,
    /// ms from the event until the new active's host held the VIP.
    new_claimed_ms: Option<f64>,
    /// The pair had handed over on its own (no fault injected) since the
    /// round before.
    unprovoked_before: bool,
    note: String,
}

/// The running pair of one system, and how to drive it.
struct Pair<'a> {
    dc: &'a Datacenter,
    s: &'a Settings,
    system: System,
    dir: PathBuf,
    procs: BTreeMap<&'static str, Vec<HostProcess>>,
    /// Log offsets at the last start, per host.
    log_at: BTreeMap<&'static str, u64>,
}

impl std::fmt::Debug for Pair<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").field("system", &self.system).finish()
    }
}

impl<'a> Pair<'a> {
    fn vip_cidr(&self) -> String {
        format!("{}/{PREFIX_LEN}", self.dc.vip())
    }

    fn log_path(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{}-{host}.log", self.system.key()))
    }

    fn config_path(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{}-{host}.conf", self.system.key()))
    }

    fn log_since_start(&self, host: &'static str) -> String {
        let at = self.log_at.get(host).copied().unwrap_or(0);
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path(host)) {
            if f.seek(SeekFrom::Start(at)).is_ok() {
                if let Err(e) = f.take(64 << 20).read_to_string(&mut text) {
                    log(&format!("cannot read the log of {host}: {e}"));
                }
            }
        }
        text
    }

    fn write_configs(&self) -> Res<()> {
        let vip = self.dc.vip();
        for (i, host) in BALANCERS.iter().enumerate() {
            let me = self.dc.host(host).ip();
            let text = match self.system {
                System::Halo => format!(
                    "# halo-lb on {host} of the benchmark pair, as a user writes it: the admin API on\n\
                     # loopback, [ha] at its defaults (no probe_listen: the probe address is the one\n\
                     # the host's Consul agent advertises), a floating VIP.\n\
                     [admin]\nlisten = \"{ADMIN}\"\n\n[consul]\naddress = \"{}\"\n\n\
                     [ha]\ncluster = \"bench\"\nid = \"{host}\"\n\
                     vip_address = \"{}\"\nvip_interface = \"{INTERFACE}\"\n\n\
                     [[vip]]\nname = \"web\"\nlisten = \"{vip}:{VIP_PORT}\"\n\
                     backends = [\"{}:{}\"]\nconnect_timeout = \"1s\"\n",
                    self.dc.agent_url(),
                    self.vip_cidr(),
                    self.dc.backend(1).ip(),
                    BACKEND_PORTS[i]
                ),
                System::Keepalived => format!(
                    "# keepalived on {host}: VRRP advert_int 1, unicast to the other balancer;\n\
                     # both BACKUP, priority 100, nopreempt (a restarted one stays the backup).\n\
                     global_defs {{\n    router_id {host}\n    enable_script_security\n}}\n\n\
                     vrrp_instance VI_1 {{\n    state BACKUP\n    interface {INTERFACE}\n    virtual_router_id 77\n\
                     \x20   priority 100\n    advert_int 1\n    nopreempt\n    unicast_src_ip {me}\n\
                     \x20   unicast_peer {{\n        {}\n    }}\n    virtual_ipaddress {{\n        {} dev {INTERFACE}\n    }}\n}}\n",
                    self.dc.host(other(host)).ip(),
                    self.vip_cidr()
                ),
                System::ConsulLock => continue,
            };
            std::fs::write(self.config_path(host), text).map_err(|e| format!("write config: {e}"))?;
        }
        Ok(())
    }

    fn start(&mut self, host: &'static str) {
        let log_path = self.log_path(host);
        self.log_at
            .insert(host, std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0));
        let h = self.dc.host(host);
        let vip = self.dc.vip().to_string();
        let mut procs = Vec::new();
        match self.system {
            System::Halo => {
                let mut cmd = h.command(&self.s.halo_lb);
                cmd.args(["--config".as_ref(), self.config_path(host).as_os_str()])
                    .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
                    .env("NO_COLOR", "1");
                procs.push(h.spawn_logged(cmd, &log_path));
            }
            System::Keepalived => {
                let mut server = h.command(&self.s.python);
                server.arg(&self.s.failover_py).args([
                    "serve",
                    "--host",
                    &vip,
                    "--port",
                    &VIP_PORT.to_string(),
                    "--name",
                    host,
                    "--freebind",
                ]);
                procs.push(h.spawn_logged(server, &self.dir.join(format!("server-{host}.log"))));
                let ka = self.s.keepalived.as_ref().expect("keepalived is present");
                let pid = |what: &str| self.dir.join(format!("ka-{host}{what}.pid"));
                // A killed keepalived leaves its pid files, and its VRRP
                // child may linger as a zombie: a new one would then say
                // "daemon is already running" and exit.
                for what in ["", "-vrrp", "-checkers"] {
                    if let Err(e) = std::fs::remove_file(pid(what)) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            log(&format!("remove {}: {e}", pid(what).display()));
                        }
                    }
                }
                let mut cmd = h.command(ka);
                cmd.args(["--dont-fork", "--log-console", "--log-detail", "--vrrp", "--use-file"])
                    .arg(self.config_path(host))
                    .arg("--pid")
                    .arg(pid(""))
                    .arg("--vrrp_pid")
                    .arg(pid("-vrrp"))
                    .arg("--checkers_pid")
                    .arg(pid("-checkers"))
                    .process_group(0);
                procs.push(h.spawn_logged(cmd, &log_path));
            }
            System::ConsulLock => {
                let child = format!(
                    "{} {} serve --host {vip} --port {VIP_PORT} --name {host} --freebind --claim {} --dev {INTERFACE}",
                    self.s.python,
                    self.s.failover_py.display(),
                    self.vip_cidr()
                );
                let mut cmd = h.command(&self.s.consul);
                cmd.args(["lock", "-verbose", "-child-exit-code", "halo/bench/lock", &child])
                    .env("CONSUL_HTTP_ADDR", self.dc.agent_addr().to_string())
                    .process_group(0);
                procs.push(h.spawn_logged(cmd, &log_path));
            }
        }
        self.procs.insert(host, procs);
    }

    fn main_proc(&mut self, host: &str) -> Option<&mut HostProcess> {
        self.procs.get_mut(host).and_then(|v| v.last_mut())
    }

    fn running(&mut self, host: &str) -> bool {
        self.main_proc(host).is_some_and(HostProcess::is_running)
    }

    /// kill -9 of the active's process (and what dies with it), then the
    /// service manager's clean-up of a leftover address.
    fn kill(&mut self, host: &'static str) {
        if let Some(procs) = self.procs.get_mut(host) {
            if self.system != System::Halo {
                // keepalived (parent and VRRP child) or `consul lock` and its
                // child: the whole process group at once.
                if let Some(p) = procs.last() {
                    let pid = i32::try_from(p.pid()).expect("pids fit in i32");
                    match killpg(Pid::from_raw(pid), Signal::SIGKILL) {
                        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                        Err(e) => log(&format!("killpg {pid}: {e}")),
                    }
                }
            }
            for p in procs.iter_mut().rev() {
                p.kill();
            }
        }
        self.release_leftover(host);
    }

    /// What a service manager runs after the process exited: `halo-lb
    /// release-vip` for halo, `ip addr del` for the others.
    fn release_leftover(&self, host: &str) {
        let h = self.dc.host(host);
        let out = match self.system {
            System::Halo => h
                .command(&self.s.halo_lb)
                .args([
                    "release-vip".as_ref(),
                    "--config".as_ref(),
                    self.config_path(host).as_os_str(),
                ])
                .output(),
            _ => h
                .command("ip")
                .args(["addr", "del", &self.vip_cidr(), "dev", INTERFACE])
                .output(),
        };
        match out {
            Ok(o) if o.status.success() || self.system != System::Halo => {}
            Ok(o) => log(&format!(
                "release-vip on {host} failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => log(&format!("release on {host}: {e}")),
        }
    }

    async fn halo_role(&self, host: &str) -> Option<String> {
        let addr: SocketAddr = ADMIN.parse().expect("a socket address");
        let stream = self.dc.host(host).connect(addr).await.ok()?;
        let (_, body) = halo_testkit::http::request_over(stream, addr, "GET", "/health").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["role"].as_str().map(str::to_owned)
    }

    async fn halo_status(&self, host: &str) -> Option<serde_json::Value> {
        let addr: SocketAddr = ADMIN.parse().expect("a socket address");
        let stream = self.dc.host(host).connect(addr).await.ok()?;
        let (_, body) = halo_testkit::http::request_over(stream, addr, "GET", "/status").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(v["ha"].clone())
    }

    /// Whether `host` serves (or is about to: holds the lock / is master).
    async fn is_active(&mut self, host: &'static str, sampler: &Sampler) -> bool {
        match self.system {
            System::Halo => self.halo_role(host).await.as_deref() == Some("active"),
            System::Keepalived => self
                .log_since_start(host)
                .rfind("Entering MASTER STATE")
                .is_some_and(|m| {
                    self.log_since_start(host)
                        .rfind("Entering BACKUP STATE")
                        .is_none_or(|b| b < m)
                }),
            System::ConsulLock => sampler.holders_now().is_some_and(|h| h[idx(host)]),
        }
    }

    /// Whether `host` is a ready standby.
    async fn is_standby(&mut self, host: &'static str) -> bool {
        if !self.running(host) {
            return false;
        }
        match self.system {
            System::Halo => self.halo_role(host).await.as_deref() == Some("standby"),
            System::Keepalived => {
                let text = self.log_since_start(host);
                let b = text.rfind("Entering BACKUP STATE");
                let m = text.rfind("Entering MASTER STATE");
                b.is_some() && (m.is_none() || m < b)
            }
            System::ConsulLock => {
                // Waiting: it tried to acquire and has not started its child
                // ("Starting handler") nor lost a lock since it started.
                let text = self.log_since_start(host);
                text.contains("Attempting lock acquisition")
                    && !text.contains("Starting handler")
                    && !text.contains("Lock lost")
            }
        }
    }

    async fn wait(&mut self, what: &str, host: &'static str, standby: bool, sampler: &Sampler) -> Res<()> {
        let deadline = Instant::now() + READY;
        loop {
            let ok = if standby {
                self.is_standby(host).await
            } else {
                self.is_active(host, sampler).await
            };
            if ok {
                return Ok(());
            }
            if !self.running(host) {
                return Err(format!(
                    "{} on {host} exited while waiting for {what}",
                    self.system.key()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("timed out after {READY:?} waiting for {what} on {host}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop_all(&mut self) {
        for procs in self.procs.values_mut() {
            for p in procs.iter_mut().rev() {
                if self.system != System::Halo {
                    let pid = i32::try_from(p.pid()).expect("pids fit in i32");
                    if p.is_running() {
                        match killpg(Pid::from_raw(pid), Signal::SIGKILL) {
                            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                            Err(e) => log(&format!("killpg {pid}: {e}")),
                        }
                    }
                }
                p.kill();
            }
        }
        self.procs.clear();
        for host in BALANCERS {
            let out = self
                .dc
                .host(host)
                .command("ip")
                .args(["addr", "del", &self.vip_cidr(), "dev", INTERFACE])
                .output();
            if let Err(e) = out {
                log(&format!("ip addr del on {host}: {e}"));
            }
        }
    }
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

fn over_budget(s: &Settings) -> bool {
    started().elapsed() > Duration::from_secs(s.max_seconds)
}

/// One system: start the pair and a client, run the rounds of each event.
async fn bench_system(
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

async fn round(
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

// ------------------------------------------------------------------- report

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

fn render(s: &Settings, dc_desc: &str, results: &BTreeMap<(System, Event), Vec<Row>>, notes: &[String]) -> String {
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

fn ip_path() -> PathBuf {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("ip"))
}

async fn bench(
    dc: &Datacenter,
    s: &Settings,
    results: &mut BTreeMap<(System, Event), Vec<Row>>,
    notes: &mut Vec<String>,
) {
    let sampler = Sampler::start(dc, ip_path());
    for &system in &s.systems {
        if system == System::Keepalived && s.keepalived.is_none() {
            continue;
        }
        if over_budget(s) {
            notes.push(format!("time budget used up before {}", system.key()));
            continue;
        }
        log(system.key());
        if let Err(e) = bench_system(dc, s, system, &sampler, results, notes).await {
            log(&format!("failed: {e}"));
            notes.push(format!("{} did not finish: {e}", system.key()));
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    started();
    let s = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("failover-dc: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if !halo_testkit::netns::required("failover-dc") {
        eprintln!("failover-dc: set HALO_NETNS_TESTS=1 and run as root");
        return std::process::ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::create_dir_all(&s.out) {
        eprintln!("failover-dc: create {}: {e}", s.out.display());
        return std::process::ExitCode::FAILURE;
    }
    let spec = DcSpec::default();
    let desc = spec.describe();
    log(&format!("starting the datacenter ({desc})"));
    let dc = Datacenter::start(spec).await;
    log(&format!("datacenter ready after {:?}", dc.startup().ready));
    let mut results = BTreeMap::new();
    let mut notes = Vec::new();
    let mut interrupted = None;
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("failover-dc: cannot handle SIGTERM: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        tokio::select! {
            () = bench(&dc, &s, &mut results, &mut notes) => {}
            _ = tokio::signal::ctrl_c() => interrupted = Some("SIGINT"),
            _ = term.recv() => interrupted = Some("SIGTERM"),
        }
    }
    if let Some(sig) = interrupted {
        notes.push(format!("interrupted by {sig}"));
    }
    // The agents' logs die with the datacenter's temp dir: keep them.
    for host in ["server1", "server2", "server3", "client", "lb1", "lb2", "backend1"] {
        if let Err(e) = std::fs::copy(dc.agent_log(host), s.out.join(format!("consul-{host}.log"))) {
            log(&format!("cannot keep the agent log of {host}: {e}"));
        }
    }
    let table = render(&s, &desc, &results, &notes);
    print!("{table}");
    if let Some(path) = &s.table {
        if let Err(e) = std::fs::write(path, &table) {
            eprintln!("failover-dc: write {}: {e}", path.display());
        }
    }
    let mut raw = String::new();
    for ((system, event), rows) in &results {
        for (i, r) in rows.iter().enumerate() {
            let _infallible = writeln!(
                raw,
                "{} {} round {}: from {} gap_ms {:.1} failed {} samples {} two_holders {} new_claimed_ms {:?} old_dropped_ms {:?} {}",
                system.key(),
                event.key(),
                i + 1,
                r.from,
                r.gap_ms,
                r.failed,
                r.samples,
                r.two_holders,
                r.new_claimed_ms,
                r.old_dropped_ms,
                r.note
            );
        }
    }
    if let Err(e) = std::fs::write(s.out.join("rounds.txt"), raw) {
        eprintln!("failover-dc: write rounds.txt: {e}");
    }
    drop(dc);
    if interrupted.is_some() || notes.iter().any(|n| n.contains("did not finish")) {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
