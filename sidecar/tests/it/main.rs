//! halo-sidecar end to end: the real binary, a real Consul agent, a real app.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_consul::{Client, HealthQuery, QueryOptions};
use halo_testkit::{eventually, free_port, ConsulAgent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

mod admin_auth;
mod behaviour;
mod config;
mod production_consul;
mod refusal;
mod service;
mod token_files;

const DEADLINE: Duration = Duration::from_secs(30);

/// The halo-sidecar binary, without the `HALO_*` variables of the
/// environment the tests run in (CI's `HALO_NETNS_TESTS`, a developer's own
/// settings): the sidecar reads every `HALO_*` as config and refuses unknown
/// ones, and each test sets exactly the ones it means.
pub fn sidecar_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo-sidecar"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HALO_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// An app with a /healthz that answers 200 or 500 as the test says.
#[derive(Debug)]
pub struct App {
    pub addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    pub async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let h = Arc::clone(&healthy);
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let ok = h.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _request = s.read(&mut buf).await;
                    let (status, body) = if ok { ("200 OK", "ok") } else { ("500 Oops", "broken") };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _written = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        App { addr, healthy, task }
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A halo-sidecar process, killed on drop.
#[derive(Debug)]
pub struct Sidecar {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    pub async fn start(config: &str, admin: SocketAddr) -> Sidecar {
        Sidecar::start_with_env(config, admin, &[]).await
    }

    /// [`Sidecar::start`] with extra environment variables.
    pub async fn start_with_env(config: &str, admin: SocketAddr, env: &[(&str, &std::ffi::OsStr)]) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("sidecar.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = sidecar_command()
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("CONSUL_HTTP_ADDR")
            .env_remove("CONSUL_HTTP_TOKEN")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut sidecar = Sidecar {
            child: Some(child),
            admin,
            config_path: path,
            log,
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            assert!(sidecar.is_running(), "halo-sidecar exited:\n{}", sidecar.log());
            if halo_testkit::http::get(admin, "/health/live").await.is_some() {
                break;
            }
            assert!(start.elapsed() < DEADLINE, "halo-sidecar not up:\n{}", sidecar.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sidecar
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// kill -9, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    pub fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "halo-sidecar did not exit:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if std::thread::panicking() {
                eprintln!("halo-sidecar log:\n{}", self.log());
            }
            let _kill_result = c.kill();
            let _wait_result = c.wait();
        }
    }
}

/// A config for service `web` instance `web-1` beside `app`, probing it
/// over HTTP every `interval`.
pub fn config(consul: &ConsulAgent, app: &App, admin: SocketAddr, interval: &str, grace: &str) -> String {
    format!(
        r#"
[consul]
address = "{consul}"

[service]
name = "web"
id = "web-1"
address = "127.0.0.1"
port = {port}
tags = ["v1"]
meta = {{ zone = "zone-a", region = "region-1", rack = "r1" }}
weights = {{ passing = 10, warning = 1 }}

[[check]]
name = "http"
type = "http"
url = "http://{app}/healthz"
interval = "{interval}"
timeout = "300ms"
rise = 1
fall = 1

[admin]
listen = "{admin}"

[drain]
grace = "{grace}"
"#,
        consul = consul.http_url(),
        port = app.addr.port(),
        app = app.addr,
    )
}

pub fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port(std::net::Ipv4Addr::LOCALHOST)))
}

/// IDs of passing `web` instances.
pub async fn passing(client: &Client) -> Option<Vec<String>> {
    let r = client
        .health_service("web", HealthQuery::passing(), QueryOptions::default())
        .await
        .ok()?;
    Some(r.value.into_iter().map(|e| e.service.id).collect())
}

/// Waits until the passing set is `want`.
pub async fn wait_passing(client: &Client, want: &[&str], deadline: Duration) {
    eventually(deadline, &format!("?passing to be {want:?}"), || async {
        (passing(client).await? == want).then_some(())
    })
    .await;
}
