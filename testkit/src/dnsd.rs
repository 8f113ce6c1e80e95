//! DNS servers and clients from Debian for the UDP tests: dnsmasq as a
//! backend, dig and dnsperf as clients. [`tools`] finds them (installing
//! Debian's packages as root when missing, `scripts/dns-tools.sh`);
//! [`Dnsmasq`] runs one server on a loopback address, killed on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the tools are.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `dnsmasq`.
    pub dnsmasq: PathBuf,
    /// `dig`.
    pub dig: PathBuf,
    /// `dnsperf`.
    pub dnsperf: PathBuf,
}

/// The tools, found once per test process.
pub fn tools() -> Tools {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let script = crate::workspace_root().join("scripts/dns-tools.sh");
            let out = Command::new("bash")
                .arg(&script)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let get = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}=")))
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("dns-tools.sh printed no {name}"))
            };
            Ok(Tools {
                dnsmasq: get("dnsmasq")?,
                dig: get("dig")?,
                dnsperf: get("dnsperf")?,
            })
        })
        .clone()
        .unwrap_or_else(|e| panic!("no DNS tools for the UDP tests: {e}"))
}

/// A port on `ip` free for both UDP and TCP (bound and released; the
/// caller binds it next): a UDP VIP's or a DNS server's port, which the
/// other protocol may want too. Taken below the kernel's ephemeral range
/// (32768 and up), so that the outgoing connections and sockets of tests
/// running beside this one (dig, dnsperf, HTTP clients: all ephemeral)
/// cannot take it before its owner binds it; never the same port twice in
/// one process.
pub fn free_udp_port(ip: Ipv4Addr) -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..10_000 {
        let port = fastrand::u16(20_000..32_000);
        let free = std::net::UdpSocket::bind((ip, port)).is_ok() && std::net::TcpListener::bind((ip, port)).is_ok();
        if free
            && GIVEN
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(port)
        {
            return port;
        }
    }
    panic!("no port on {ip} in 20000..32000 is free for both UDP and TCP");
}

/// One dnsmasq on `addr` that answers every name under `example.test`
/// with the A record `answer` (so a client can tell the backends apart),
/// with no upstream, no hosts file and no cache. Killed on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    /// Where it listens (UDP and TCP).
    pub addr: SocketAddr,
    /// The address it answers with.
    pub answer: Ipv4Addr,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts one on a free port of 127.0.0.1 and waits until it answers
    /// a query (on another port if a test elsewhere took the one it was
    /// given before it could bind).
    pub fn start(answer: Ipv4Addr) -> Dnsmasq {
        for _ in 0..10 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_udp_port(Ipv4Addr::LOCALHOST)));
            let dir = tempfile::tempdir().expect("tempdir");
            let child = Self::spawn(addr, answer, &dir);
            let mut d = Dnsmasq {
                addr,
                answer,
                child: Some(child),
                _dir: dir,
            };
            if d.wait_answering() {
                return d;
            }
        }
        panic!("dnsmasq did not start on any of 10 ports");
    }

    fn spawn(addr: SocketAddr, answer: Ipv4Addr, dir: &tempfile::TempDir) -> Child {
        Command::new(tools().dnsmasq)
            .arg("--keep-in-foreground")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--no-poll")
            .arg("--cache-size=0")
            .arg("--bind-interfaces")
            .arg(format!("--listen-address={}", addr.ip()))
            .arg("--interface=lo")
            .arg(format!("--port={}", addr.port()))
            .arg(format!("--address=/example.test/{answer}"))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg("--user=root")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).expect("log file"))
            .spawn()
            .expect("start dnsmasq")
    }

    /// Waits until it answers; false if it exited (its port was taken).
    fn wait_answering(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while dig(self.addr, "ready.example.test", None).as_deref() != Some(self.answer.to_string().as_str()) {
            if self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some())
            {
                return false;
            }
            assert!(Instant::now() < deadline, "dnsmasq on {} does not answer", self.addr);
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Kills it (SIGKILL) and waits for it: its port answers with ICMP
    /// port-unreachable from now on.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(Self::spawn(self.addr, self.answer, &self._dir));
        assert!(self.wait_answering(), "dnsmasq could not start again on {}", self.addr);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `dig +short` A query for `name` to `server` (optionally from a fixed
/// local port), one try with a one-second timeout: the answer, or `None`.
pub fn dig(server: SocketAddr, name: &str, from_port: Option<u16>) -> Option<String> {
    let mut cmd = Command::new(tools().dig);
    cmd.arg("+short")
        .arg("+tries=1")
        .arg("+time=1")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string());
    if let Some(port) = from_port {
        cmd.arg("-b").arg(format!("127.0.0.1#{port}"));
    }
    let out = cmd.arg(name).arg("A").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty() && !text.starts_with(';')).then_some(text)
}

/// What a dnsperf run reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct Perf {
    /// Queries sent.
    pub sent: u64,
    /// Queries answered.
    pub completed: u64,
    /// Queries per second.
    pub qps: f64,
}

impl Perf {
    /// Answered ÷ sent.
    pub fn answered(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            self.completed as f64 / self.sent as f64
        }
    }
}

/// Runs dnsperf against `server` for `seconds` with `clients` sockets
/// (each its own flow), at most `qps` queries a second, names from
/// `example.test` (answered by every [`Dnsmasq`]).
pub fn dnsperf(server: SocketAddr, seconds: u32, clients: u32, qps: u32) -> Perf {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("queries");
    std::fs::write(&data, "a.example.test A\nb.example.test A\nc.example.test A\n").expect("write queries");
    let out = Command::new(tools().dnsperf)
        .arg("-s")
        .arg(server.ip().to_string())
        .arg("-p")
        .arg(server.port().to_string())
        .arg("-d")
        .arg(&data)
        .arg("-l")
        .arg(seconds.to_string())
        .arg("-c")
        .arg(clients.to_string())
        .arg("-Q")
        .arg(qps.to_string())
        .arg("-t")
        .arg("2")
        .output()
        .expect("run dnsperf");
    parse_dnsperf(&String::from_utf8_lossy(&out.stdout))
}

/// dnsperf's summary: "Queries sent", "Queries completed", "Queries per
/// second".
pub fn parse_dnsperf(text: &str) -> Perf {
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Perf {
        sent: field("Queries sent:").unwrap_or(0.0) as u64,
        completed: field("Queries completed:").unwrap_or(0.0) as u64,
        qps: field("Queries per second:").unwrap_or(0.0),
    }
}
