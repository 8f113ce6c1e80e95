//! One system's pair on the two balancer hosts: writing its configuration,
//! starting it on a host, killing it there (and cleaning up as a service
//! manager would), and asking whether a host is the active or a ready
//! standby.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use halo_testkit::dc::Datacenter;
use halo_testkit::netns::{HostProcess, INTERFACE, PREFIX_LEN};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::sampler::{idx, Sampler};
use crate::settings::{Settings, System};
use crate::{log, other, Res, ADMIN, BACKEND_PORTS, BALANCERS, READY, VIP_PORT};

/// The running pair of one system, and how to drive it.
pub(crate) struct Pair<'a> {
    pub(crate) dc: &'a Datacenter,
    pub(crate) s: &'a Settings,
    pub(crate) system: System,
    pub(crate) dir: PathBuf,
    pub(crate) procs: BTreeMap<&'static str, Vec<HostProcess>>,
    /// Log offsets at the last start, per host.
    pub(crate) log_at: BTreeMap<&'static str, u64>,
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

    pub(crate) fn write_configs(&self) -> Res<()> {
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

    pub(crate) fn start(&mut self, host: &'static str) {
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

    pub(crate) fn running(&mut self, host: &str) -> bool {
        self.main_proc(host).is_some_and(HostProcess::is_running)
    }

    /// kill -9 of the active's process (and what dies with it), then the
    /// service manager's clean-up of a leftover address.
    pub(crate) fn kill(&mut self, host: &'static str) {
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

    pub(crate) async fn halo_status(&self, host: &str) -> Option<serde_json::Value> {
        let addr: SocketAddr = ADMIN.parse().expect("a socket address");
        let stream = self.dc.host(host).connect(addr).await.ok()?;
        let (_, body) = halo_testkit::http::request_over(stream, addr, "GET", "/status").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(v["ha"].clone())
    }

    /// Whether `host` serves (or is about to: holds the lock / is master).
    pub(crate) async fn is_active(&mut self, host: &'static str, sampler: &Sampler) -> bool {
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
    pub(crate) async fn is_standby(&mut self, host: &'static str) -> bool {
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

    pub(crate) async fn wait(&mut self, what: &str, host: &'static str, standby: bool, sampler: &Sampler) -> Res<()> {
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

    pub(crate) fn stop_all(&mut self) {
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
