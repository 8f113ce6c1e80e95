//! One test's rig: the datacenter, the backends (python's http.server,
//! each registered by halo-sidecar through its host's agent) and halo-lb on
//! the balancer hosts, with what the scenarios ask of them: start, roles,
//! tables, kill -9, power-off, the terms of every process, and the checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use halo_testkit::dc::{Datacenter, DcSpec};
use halo_testkit::eventually;
use halo_testkit::netns::HostProcess;
use serde_json::Value;

use super::observe::{assert_no_overlap, assert_one_holder, terms, Excuse, Prober, TermRec};
use super::{role, unix_us, ADMIN_PORT, BACKEND_PORT, SIDECAR_PORT, VIP_PORT, WAIT};

/// halo-sidecar's binary, next to halo-lb's; built once if missing (a
/// `cargo test -p halo-lb` does not build other packages' binaries).
fn sidecar_binary() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = Path::new(env!("CARGO_BIN_EXE_halo-lb")).with_file_name("halo-sidecar");
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let mut build = Command::new(cargo);
            build
                .args(["build", "-p", "halo-sidecar", "--bin", "halo-sidecar"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if path.parent().is_some_and(|dir| dir.ends_with("release")) {
                build.arg("--release");
            }
            let status = build.status().expect("run cargo build -p halo-sidecar");
            assert!(status.success(), "cargo build -p halo-sidecar failed: {status}");
            assert!(path.exists(), "no {} after building it", path.display());
        }
        path
    })
}

/// A backend host's app (python's http.server, a real process in the host)
/// and the halo-sidecar that registers it with the host's own agent.
struct Backend {
    _http: HostProcess,
    _sidecar: HostProcess,
}

fn start_backend(dc: &Datacenter, i: usize, dir: &Path) -> Backend {
    let name = format!("backend{i}");
    let host = dc.backend(i);
    let ip = host.ip();
    let root = dir.join(format!("{name}-www"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), format!("{name}\n")).unwrap();
    let mut http = host.command("python3");
    http.args([
        "-m",
        "http.server",
        &BACKEND_PORT.to_string(),
        "--bind",
        &ip.to_string(),
    ])
    .arg("--directory")
    .arg(&root);
    let http = dc.spawn(&name, http, "http");
    let config = dir.join(format!("{name}-sidecar.toml"));
    std::fs::write(
        &config,
        format!(
            "[consul]\naddress = \"{}\"\n\n[service]\nname = \"web\"\nid = \"web-{name}\"\naddress = \"{ip}\"\nport = {BACKEND_PORT}\n\n\
             [[check]]\nname = \"http\"\ntype = \"http\"\nurl = \"http://{ip}:{BACKEND_PORT}/\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\nrise = 1\n\n\
             [admin]\nlisten = \"{ip}:{SIDECAR_PORT}\"\n\n[drain]\ngrace = \"1s\"\n",
            dc.agent_url()
        ),
    )
    .unwrap();
    let mut sidecar = host.command(sidecar_binary());
    sidecar.arg("--config").arg(&config).env("NO_COLOR", "1");
    let sidecar = dc.spawn(&name, sidecar, "halo-sidecar");
    Backend {
        _http: http,
        _sidecar: sidecar,
    }
}

/// One halo-lb process in a balancer host.
pub(super) struct Balancer {
    host: String,
    admin: SocketAddr,
    pub(super) process: HostProcess,
}

impl Balancer {
    fn log_tail(&self) -> String {
        self.process.log_tail(6000)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("halo-lb on {} (log tail):\n{}", self.host, self.log_tail());
        }
    }
}

/// The config of the instance on `lb<i>`, as a user writes it: the admin
/// API on loopback and no `probe_listen` (the probe address is the one the
/// host's agent advertises), a floating VIP on `eth0`, Consul at the host's
/// own agent, the backends from the catalog (service `web`).
fn lb_config(dc: &Datacenter, i: usize) -> String {
    format!(
        "drain_timeout = \"2s\"\n[admin]\nlisten = \"127.0.0.1:{ADMIN_PORT}\"\n[consul]\naddress = \"{}\"\n\
         [ha]\ncluster = \"prod\"\nid = \"lb{i}\"\nvip_address = \"{}/24\"\nvip_interface = \"eth0\"\n\
         [[vip]]\nname = \"web\"\nlisten = \"{}:{VIP_PORT}\"\nservice = \"web\"\n",
        dc.agent_url(),
        dc.vip(),
        dc.vip()
    )
}

/// The body of a GET of `path` from `host`'s view of `addr`.
async fn host_get(dc: &Datacenter, host: &str, addr: SocketAddr, path: &str) -> Option<String> {
    let stream = dc.host(host).connect(addr).await.ok()?;
    let (code, body) = halo_testkit::http::request_over(stream, addr, "GET", path).await?;
    (code == 200).then_some(body)
}

/// The datacenter, backends and balancers of one test.
pub(super) struct Rig {
    // Balancers first: their log tails print before the datacenter's
    // teardown while panicking.
    pub(super) lbs: Vec<Option<Balancer>>,
    /// Terms of processes that are gone, closed at their death.
    retired: Vec<TermRec>,
    /// Processes started per host, to name them in terms (`lb1#2`).
    generation: Vec<usize>,
    _backends: Vec<Backend>,
    pub(super) dc: Datacenter,
    dir: tempfile::TempDir,
}

impl Rig {
    /// Starts the datacenter, the backends with their sidecars, `lb1` (and
    /// waits until it is active), then the others (standbys), and waits
    /// until every balancer's table has every backend and the client is
    /// served through the VIP.
    pub(super) async fn start(spec: DcSpec) -> Rig {
        let dc = Datacenter::start(spec).await;
        let dir = tempfile::tempdir().unwrap();
        let backends: Vec<Backend> = (1..=dc.spec().backends)
            .map(|i| start_backend(&dc, i, dir.path()))
            .collect();
        let n = backends.len();
        eventually(WAIT, "every backend passing in the catalog", || async {
            let passing = dc.get_json("client", "/v1/health/service/web?passing").await?;
            (passing.as_array()?.len() == n).then_some(())
        })
        .await;
        let balancers = dc.spec().balancers;
        let mut rig = Rig {
            lbs: (0..balancers).map(|_| None).collect(),
            retired: Vec::new(),
            generation: vec![0; balancers],
            _backends: backends,
            dc,
            dir,
        };
        rig.launch(1);
        rig.wait_role(1, "active").await;
        for i in 2..=balancers {
            rig.launch(i);
            rig.wait_role(i, "standby").await;
        }
        for i in 1..=balancers {
            rig.wait_table(i).await;
        }
        let (netns, vip) = (rig.dc.client().netns().to_owned(), rig.vip());
        eventually(WAIT, "the client to be served through the VIP", || {
            let netns = netns.clone();
            async move {
                let p = Prober::start(&netns, vip, 1, Duration::from_millis(500), Duration::from_secs(2));
                tokio::time::sleep(Duration::from_millis(50)).await;
                p.stop().iter().any(|p| p.ok).then_some(())
            }
        })
        .await;
        rig
    }

    pub(super) fn vip(&self) -> SocketAddr {
        SocketAddr::from((self.dc.vip(), VIP_PORT))
    }

    pub(super) fn lb(&self, i: usize) -> &Balancer {
        self.lbs[i - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("no halo-lb runs on lb{i}"))
    }

    fn who(&self, i: usize) -> String {
        format!("lb{i}#{}", self.generation[i - 1])
    }

    /// Starts halo-lb on `lb<i>` (nothing may run there).
    pub(super) fn launch(&mut self, i: usize) {
        assert!(self.lbs[i - 1].is_none(), "halo-lb already runs on lb{i}");
        let config = self.dir.path().join(format!("lb{i}.toml"));
        std::fs::write(&config, lb_config(&self.dc, i)).unwrap();
        let host = format!("lb{i}");
        let mut cmd = self.dc.host(&host).command(env!("CARGO_BIN_EXE_halo-lb"));
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,halo_lb=debug")
            .env("NO_COLOR", "1");
        let process = self.dc.spawn(&host, cmd, "halo-lb");
        self.generation[i - 1] += 1;
        self.lbs[i - 1] = Some(Balancer {
            admin: SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
            host,
            process,
        });
    }

    /// `/status` of `lb<i>`'s instance, asked from inside its host.
    pub(super) async fn status(&self, i: usize) -> Option<Value> {
        let lb = self.lb(i);
        serde_json::from_str(&host_get(&self.dc, &lb.host, lb.admin, "/status").await?).ok()
    }

    /// `/metrics` of `lb<i>`'s instance.
    pub(super) async fn metrics(&self, i: usize) -> String {
        let lb = self.lb(i);
        host_get(&self.dc, &lb.host, lb.admin, "/metrics")
            .await
            .unwrap_or_else(|| panic!("lb{i}'s /metrics answers"))
    }

    pub(super) async fn wait_role(&self, i: usize, want: &str) -> Value {
        eventually(WAIT, &format!("lb{i} to be {want}"), || async {
            let s = self.status(i).await?;
            (role(&s) == want).then_some(s)
        })
        .await
    }

    pub(super) async fn wait_table(&self, i: usize) {
        let n = self.dc.spec().backends;
        eventually(WAIT, &format!("lb{i}'s table to have every backend"), || async {
            let s = self.status(i).await?;
            (s["vips"][0]["backends"].as_array()?.len() == n).then_some(())
        })
        .await;
    }

    /// The balancer that is active, waiting until exactly one says so.
    pub(super) async fn active(&self) -> usize {
        eventually(WAIT, "one active balancer", || async {
            let mut active = Vec::new();
            for i in 1..=self.lbs.len() {
                if self.lbs[i - 1].is_some() && role(&self.status(i).await?) == "active" {
                    active.push(i);
                }
            }
            (active.len() == 1).then(|| active[0])
        })
        .await
    }

    /// SIGKILLs `lb<i>`'s process (after reading its terms; its open term
    /// ends at the kill); returns when it was killed.
    pub(super) async fn kill(&mut self, i: usize) -> Instant {
        let status = self.status(i).await.expect("the victim's /status answers");
        let at = Instant::now();
        let wall = unix_us(SystemTime::now());
        let mut lb = self.lbs[i - 1].take().unwrap();
        lb.process.kill();
        let who = self.who(i);
        self.retired.extend(terms(&who, &status, wall));
        at
    }

    /// Powers `lb<i>`'s host off (its terms read first; its open term ends
    /// at the power-off); returns when.
    pub(super) async fn power_off(&mut self, i: usize) -> Instant {
        let status = self.status(i).await.expect("the victim's /status answers");
        let at = Instant::now();
        let wall = unix_us(SystemTime::now());
        self.dc.power_off(&format!("lb{i}"));
        let mut lb = self.lbs[i - 1].take().unwrap();
        lb.process.kill();
        let who = self.who(i);
        self.retired.extend(terms(&who, &status, wall));
        at
    }

    /// Every term: those of gone processes and every live instance's own.
    async fn all_terms(&self) -> Vec<TermRec> {
        let mut all = self.retired.clone();
        for i in 1..=self.lbs.len() {
            if self.lbs[i - 1].is_some() {
                let s = self
                    .status(i)
                    .await
                    .unwrap_or_else(|| panic!("lb{i}'s /status answers"));
                all.extend(terms(&self.who(i), &s, unix_us(SystemTime::now())));
            }
        }
        all
    }

    /// Checks the terms and the VIP samples; prints the figures.
    pub(super) async fn check(&self, scenario: &str, samples: &[(Instant, Vec<usize>)], excuses: &[Excuse]) {
        let all = self.all_terms().await;
        let closest = assert_no_overlap(&all);
        let (n, empty) = assert_one_holder(samples, excuses);
        eprintln!(
            "FIGURE {scenario}: {} terms, none overlapping (closest handover {} ms on the instances' own clocks); \
             {n} VIP samples, none with two holders ({} excused windows), {empty} with none; {}",
            all.len(),
            closest.map_or("-".to_owned(), |us| format!("{:.1}", us as f64 / 1000.0)),
            excuses.len(),
            self.dc.spec().describe()
        );
    }

    pub(super) fn holds_vip(&self, i: usize) -> bool {
        self.dc.lb(i).addresses().contains(&self.dc.vip())
    }

    /// Probes from the client host: four threads, 150 ms connect timeout
    /// (so an unserved VIP costs an attempt 150 ms, not a SYN retransmit).
    pub(super) fn prober(&self) -> Prober {
        Prober::start(
            self.dc.client().netns(),
            self.vip(),
            4,
            Duration::from_millis(150),
            Duration::from_secs(1),
        )
    }

    /// Waits until a probe that started after `t` succeeded.
    pub(super) async fn served_after(&self, t: Instant) {
        let (netns, vip) = (self.dc.client().netns().to_owned(), self.vip());
        eventually(WAIT, "the client to be served through the VIP", || {
            let netns = netns.clone();
            async move {
                let p = Prober::start(&netns, vip, 1, Duration::from_millis(150), Duration::from_secs(1));
                tokio::time::sleep(Duration::from_millis(20)).await;
                p.stop().iter().any(|p| p.ok && p.at >= t).then_some(())
            }
        })
        .await;
    }
}
