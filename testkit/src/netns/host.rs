//! One host of a topology ([`Host`]: a namespace with `lo` and `eth0` up)
//! and the processes started in it ([`HostProcess`]: SIGKILLed and reaped
//! when its guard drops).

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::tools::{ip, ip_run, run};
use super::INTERFACE;

/// A pid as nix wants it.
pub(super) fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"))
}

/// The last `max` bytes of the file at `path`, lossy UTF-8; empty if it
/// cannot be read.
pub(crate) fn tail(path: &std::path::Path, max: u64) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(max))).is_ok() {
            if let Err(e) = f.take(max).read_to_end(&mut buf) {
                return format!("(cannot read {}: {e})", path.display());
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// One host of a [`Topology`](super::Topology): a namespace with `lo` and
/// `eth0` up.
#[derive(Debug)]
pub struct Host {
    pub(super) name: String,
    pub(super) netns: String,
    pub(super) ip: Ipv4Addr,
    pub(super) ip6: Ipv6Addr,
    pub(super) mac: String,
    /// Pids of the processes started with [`Host::spawn`], which the
    /// topology kills on drop: `ip netns pids` misses one that has not yet
    /// entered the namespace.
    pub(super) spawned: Arc<Mutex<Vec<u32>>>,
}

impl Host {
    /// `client`, `lb1`, `lb2` or `backend` in a
    /// [`Topology::start`](super::Topology::start); see [`crate::dc`] for a
    /// datacenter's names. Also the name of its port on the bridge.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name, for `ip netns exec` and `ip -n`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its address on [`INTERFACE`].
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its IPv6 address on [`INTERFACE`] (2001:2::x, x as in [`Host::ip`]).
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// The MAC of its [`INTERFACE`], as `ip` prints it (`aa:bb:…`).
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// `ip netns exec <netns> <program>`: add arguments and run it, or hand
    /// it to [`Host::spawn`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(ip());
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// Runs `program args…` in the namespace and returns its stdout; panics
    /// with its stderr if it fails.
    pub fn run<I, S>(&self, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(self.command(program).args(args))
    }

    /// Starts a long-running process made by [`Host::command`]. It is killed
    /// when the returned guard drops, when the test's thread dies
    /// (`PR_SET_PDEATHSIG`), or at the latest with the topology.
    pub fn spawn(&self, cmd: Command) -> HostProcess {
        self.spawn_inner(cmd, None)
    }

    /// [`Host::spawn`] with the process's stdout and stderr appended to
    /// `log` (created if missing), which [`HostProcess::log_tail`] reads.
    pub fn spawn_logged(&self, mut cmd: Command, log: &std::path::Path) -> HostProcess {
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", log.display()));
        let stderr = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone log file handle {}: {e}", log.display()));
        cmd.stdin(Stdio::null()).stdout(file).stderr(stderr);
        self.spawn_inner(cmd, Some(log.to_path_buf()))
    }

    fn spawn_inner(&self, mut cmd: Command, log: Option<PathBuf>) -> HostProcess {
        let args: Vec<&OsStr> = cmd.get_args().take(3).collect();
        assert!(
            args == [OsStr::new("netns"), OsStr::new("exec"), OsStr::new(&self.netns)],
            "Host::spawn takes a command from Host::command, so that it runs in {}",
            self.netns
        );
        crate::process::kill_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?} in {}: {e}", self.netns));
        self.spawned.lock().expect("spawned pids poisoned").push(child.id());
        HostProcess {
            host: self.name.clone(),
            child,
            log,
            spawned: Arc::clone(&self.spawned),
        }
    }

    /// Runs `f` on a thread that has entered this host's network namespace.
    /// Sockets made there stay in the namespace and may be used from any
    /// thread afterwards, which is how a test talks to a host directly.
    pub fn within<T, F>(&self, f: F) -> std::io::Result<T>
    where
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    }

    /// A TCP connection from this host to `addr`, as a tokio stream.
    pub async fn connect(&self, addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let stream = self.within(move || {
            let stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        })?;
        tokio::net::TcpStream::from_std(stream)
    }

    /// Sets a sysctl of this namespace (`key` as in `sysctl`, with dots).
    /// Writes `/proc/sys` directly: procps' `sysctl` is not always installed.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run("sh", ["-c", "echo \"$1\" > \"$2\"", "sh", value, &path]);
    }

    /// The MAC this host's neighbour table has for `ip` (IPv4 or IPv6) on
    /// [`INTERFACE`], in any state with an address (REACHABLE, STALE, DELAY,
    /// …).
    pub fn neighbour(&self, ip: impl Into<IpAddr>) -> Option<String> {
        let ip: IpAddr = ip.into();
        let out = ip_run(["-n", &self.netns, "neigh", "show", &ip.to_string(), "dev", INTERFACE]);
        let mut words = out.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_owned)
    }

    /// The global IPv6 addresses on [`INTERFACE`], without prefix lengths.
    pub fn addresses_v6(&self) -> Vec<Ipv6Addr> {
        let out = ip_run([
            "-n",
            &self.netns,
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            INTERFACE,
            "scope",
            "global",
        ]);
        out.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet6")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect()
    }

    /// The IPv4 addresses on [`INTERFACE`], without prefix lengths.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        let out = ip_run(["-n", &self.netns, "-4", "-o", "addr", "show", "dev", INTERFACE]);
        out.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect()
    }
}

/// A process started in a host's namespace; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct HostProcess {
    host: String,
    child: Child,
    /// Where its output goes, if started with [`Host::spawn_logged`].
    log: Option<PathBuf>,
    /// Its host's list of unreaped pids, which it leaves once reaped so
    /// that the topology never signals a reused pid.
    spawned: Arc<Mutex<Vec<u32>>>,
}

impl HostProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child, for its stdin and stdout pipes and its exit status.
    /// Reaping it here (`wait`) rather than through this guard leaves its
    /// pid on the topology's kill list until the guard drops.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether it has been reaped; takes its pid off the host's kill list
    /// if so.
    fn reaped(&mut self) -> bool {
        let done = matches!(self.child.try_wait(), Ok(Some(_)));
        if done {
            let pid = self.child.id();
            self.spawned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|p| *p != pid);
        }
        done
    }

    /// The name of the host it runs in.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Its log file, if started with [`Host::spawn_logged`].
    pub fn log_path(&self) -> Option<&std::path::Path> {
        self.log.as_deref()
    }

    /// The last `max` bytes of its log file (lossy UTF-8); empty without
    /// one.
    pub fn log_tail(&self, max: u64) -> String {
        self.log.as_deref().map(|p| tail(p, max)).unwrap_or_default()
    }

    /// Whether it has not exited yet (reaping it if it has).
    pub fn is_running(&mut self) -> bool {
        !self.reaped()
    }

    /// Sends `signal` to it; an error if it has exited and been reaped
    /// (the pid is still ours until then, so it cannot hit another process).
    pub fn signal(&mut self, signal: Signal) -> nix::Result<()> {
        if self.reaped() {
            return Err(nix::errno::Errno::ESRCH);
        }
        kill(pid_of(self.child.id()), signal)
    }

    /// Freezes it with SIGSTOP, as a stalled VM or a debugger would: its
    /// sockets stay open and the kernel still completes TCP handshakes on
    /// its listeners, but nothing is read or answered. Panics if it has
    /// exited.
    pub fn pause(&mut self) {
        if let Err(e) = self.signal(Signal::SIGSTOP) {
            panic!("cannot SIGSTOP {} in {}: {e}", self.child.id(), self.host);
        }
    }

    /// Thaws it with SIGCONT after [`HostProcess::pause`]. Panics if it has
    /// exited.
    pub fn resume(&mut self) {
        if let Err(e) = self.signal(Signal::SIGCONT) {
            panic!("cannot SIGCONT {} in {}: {e}", self.child.id(), self.host);
        }
    }

    /// SIGKILLs and reaps it, as a crash would. Idempotent.
    pub fn kill(&mut self) {
        if self.reaped() {
            return;
        }
        if let Err(e) = self.child.kill() {
            eprintln!("testkit: kill {} in {}: {e}", self.child.id(), self.host);
        }
        if let Err(e) = self.child.wait() {
            eprintln!("testkit: reap {} in {}: {e}", self.child.id(), self.host);
        }
        self.reaped();
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
