//! The halo-lb pair under test, driven and recorded: its configuration and
//! the backends' echo servers and sidecars, starting and retiring each
//! instance (every process's life and `/proc` figures, every term it
//! reports in `/status`), waiting for roles, and making the pair whole again
//! after a fault. The faults themselves are in [`crate::inject`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use halo_testkit::dc::Datacenter;
use halo_testkit::netns::{HostProcess, INTERFACE, PREFIX_LEN};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::clients::Seen;
use crate::fault::FaultRec;
use crate::settings::Settings;
use crate::{log, other, unix_us, Res, ADMIN, BACKENDS, ECHO_PORT, READY, SIDECAR_PORT, VIP_PORT};

/// `/proc` figures of a process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcStat {
    pub(crate) fds: usize,
    pub(crate) rss_kib: u64,
}

pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
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
pub(crate) struct Life {
    pub(crate) who: String,
    pub(crate) born: Instant,
    pub(crate) died: Option<Instant>,
    pub(crate) start: Option<ProcStat>,
    pub(crate) end: Option<ProcStat>,
    /// The most seen at any sample (after each recovery, and the end).
    pub(crate) peak: Option<ProcStat>,
    pub(crate) how: &'static str,
}

impl Life {
    pub(crate) fn saw(&mut self, s: Option<ProcStat>) {
        if let Some(s) = s {
            let p = self.peak.get_or_insert(s);
            p.fds = p.fds.max(s.fds);
            p.rss_kib = p.rss_kib.max(s.rss_kib);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Lb {
    pub(crate) who: String,
    pub(crate) process: HostProcess,
    pub(crate) life: usize,
}

/// A term of some process, on the shared kernel clock (unix µs).
#[derive(Debug, Clone)]
pub(crate) struct TermRec {
    pub(crate) who: String,
    pub(crate) epoch: u64,
    pub(crate) from: u64,
    pub(crate) to: Option<u64>,
}

/// A host whose holding the VIP is excused: its process killed, frozen or
/// powered off, until restarted, powered on, or it removed the address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Excuse {
    pub(crate) lb: usize,
    pub(crate) from: Instant,
    pub(crate) until: Instant,
}

/// The run: the pair's processes and what is recorded about them.
pub(crate) struct Soak<'a> {
    pub(crate) dc: &'a Datacenter,
    pub(crate) s: &'a Settings,
    pub(crate) seen: Arc<Seen>,
    pub(crate) lbs: [Option<Lb>; 2],
    pub(crate) generation: [usize; 2],
    /// Every term seen, by (who, epoch, from).
    pub(crate) terms: Mutex<BTreeMap<(String, u64, u64), Option<u64>>>,
    pub(crate) lives: Vec<Life>,
    pub(crate) excuses: Vec<Excuse>,
    pub(crate) faults: Vec<FaultRec>,
    pub(crate) violations: Vec<String>,
    pub(crate) notes: Vec<String>,
    pub(crate) restarts_damped: usize,
}

impl std::fmt::Debug for Soak<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Soak").field("faults", &self.faults.len()).finish()
    }
}

pub(crate) fn role(status: &Value) -> &str {
    status["ha"]["role"].as_str().unwrap_or("?")
}

impl<'a> Soak<'a> {
    fn config_path(&self, i: usize) -> PathBuf {
        self.s.out.join(format!("lb{i}.toml"))
    }

    pub(crate) fn write_configs(&self) -> Res<()> {
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

    pub(crate) fn start_backends(&self) -> Res<Vec<HostProcess>> {
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

    pub(crate) fn who(&self, i: usize) -> String {
        format!("lb{i}#{}", self.generation[i - 1])
    }

    /// Starts halo-lb on `lb<i>` (nothing may run there).
    pub(crate) fn launch(&mut self, i: usize) {
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
    pub(crate) async fn status(&self, i: usize) -> Option<Value> {
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

    pub(crate) async fn metrics(&self, i: usize) -> Option<String> {
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
    pub(crate) async fn retire(
        &mut self,
        i: usize,
        how: &'static str,
        end: impl FnOnce(&mut Lb, &Datacenter),
    ) -> Res<()> {
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

    pub(crate) async fn wait<T, F, Fut>(&self, what: &str, limit: Duration, mut f: F) -> Res<T>
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

    pub(crate) async fn wait_role(&self, i: usize, want: &str) -> Res<Value> {
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

    pub(crate) async fn served_after(&self, t: Instant) -> Res<()> {
        self.wait("the client to be served again", READY, || async {
            self.seen.served_after(t).then_some(())
        })
        .await
    }

    /// The active: exactly one instance says so.
    pub(crate) async fn active(&self) -> Res<usize> {
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

    pub(crate) fn holds_vip(&self, i: usize) -> bool {
        self.dc.lb(i).addresses().contains(&self.dc.vip())
    }

    /// What a service manager runs after halo-lb exited (the packaged
    /// unit's ExecStopPost): `halo-lb release-vip`.
    pub(crate) fn release_vip(&mut self, i: usize) {
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
    pub(crate) async fn make_whole(&mut self) -> Res<()> {
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
}
