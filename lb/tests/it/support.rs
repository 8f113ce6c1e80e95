//! Test support: loopback backends and a halo-lb process that dies with its
//! handle.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use halo_testkit::{eventually, free_port};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Generous deadline for conditions to become true.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A free port on 127.0.0.1.
pub fn port() -> u16 {
    free_port(Ipv4Addr::LOCALHOST)
}

/// What a test backend does with a connection.
#[derive(Debug, Clone, Copy)]
pub enum Behavior {
    /// Writes "<name>\n", then echoes until EOF, then closes.
    GreetEcho,
    /// Reads until EOF, then writes "got <n> bytes\n" and closes (half-close test).
    CountThenReply,
    /// Reads everything and records the first bytes (PROXY header test).
    Record,
}

/// A backend on 127.0.0.1 that runs until dropped or killed; killing it
/// closes its listener and every connection it holds.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub recorded: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    tasks: Option<tokio::task::JoinHandle<()>>,
    close: Option<tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<()>>>,
}

impl TestBackend {
    pub async fn start(name: &str, behavior: Behavior) -> TestBackend {
        TestBackend::start_at("127.0.0.1:0".parse().unwrap(), name, behavior).await
    }

    /// Starts on `addr`: a killed backend comes back on its old address.
    pub async fn start_at(addr: SocketAddr, name: &str, behavior: Behavior) -> TestBackend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (n, r) = (name.to_owned(), Arc::clone(&recorded));
        let (close, mut closed) = tokio::sync::oneshot::channel::<tokio::sync::oneshot::Sender<()>>();
        let tasks = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let done = loop {
                let accepted = tokio::select! {
                    done = &mut closed => break done.ok(),
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                let (n, r) = (n.clone(), Arc::clone(&r));
                conns.spawn(async move { serve(stream, behavior, &n, &r).await });
                while conns.try_join_next().is_some() {}
            };
            // Closed: no more connections; the live ones finish.
            drop(listener);
            if let Some(done) = done {
                let _closer_may_be_gone = done.send(());
            }
            while conns.join_next().await.is_some() {}
        });
        TestBackend {
            addr,
            recorded,
            tasks: Some(tasks),
            close: Some(close),
        }
    }

    /// Closes the listener (new connections are refused) and lets live
    /// connections finish: a process dying between requests. Returns once
    /// the listener is closed. (Connections the kernel had completed but the
    /// backend not yet accepted are reset, as in a real crash.)
    pub async fn close_listener(&mut self) {
        if let Some(close) = self.close.take() {
            let (done, closed) = tokio::sync::oneshot::channel();
            if close.send(done).is_ok() {
                let _task_may_be_gone = closed.await;
            }
        }
    }

    /// Closes the listener and every live connection, like a crash.
    pub fn kill(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
        }
    }
}

impl TestBackend {
    /// Kills the backend and waits until its port refuses connections: the
    /// abort takes effect asynchronously, and until then a connect can still
    /// land in the old listener's backlog (and be reset).
    pub async fn kill_and_wait(&mut self) {
        self.kill();
        let addr = self.addr;
        halo_testkit::eventually(DEADLINE, "the killed backend to refuse connections", || async move {
            TcpStream::connect(addr).await.is_err().then_some(())
        })
        .await;
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve(mut stream: TcpStream, behavior: Behavior, name: &str, recorded: &std::sync::Mutex<Vec<Vec<u8>>>) {
    match behavior {
        Behavior::GreetEcho => {
            if stream.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                return;
            }
            let (mut r, mut w) = stream.split();
            let _echo_result = tokio::io::copy(&mut r, &mut w).await;
        }
        Behavior::CountThenReply => {
            let mut buf = Vec::new();
            if stream.read_to_end(&mut buf).await.is_ok() {
                let _reply_result = stream.write_all(format!("got {} bytes\n", buf.len()).as_bytes()).await;
            }
        }
        Behavior::Record => {
            let mut buf = vec![0u8; 256];
            let mut got = Vec::new();
            // The header arrives first, in one segment on loopback; read what
            // is there, then answer so the client knows we have it.
            if let Ok(n) = stream.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
            recorded.lock().unwrap().push(got);
            let _ack_result = stream.write_all(b"ok\n").await;
        }
    }
}

/// Connects to `vip` and reads the greeting line: the backend's name.
pub async fn greeting(vip: SocketAddr) -> std::io::Result<(String, BufReader<TcpStream>)> {
    let stream = TcpStream::connect(vip).await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no greeting"))??;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before greeting",
        ));
    }
    Ok((line.trim().to_owned(), reader))
}

/// A halo-lb process, killed (SIGKILL) when dropped.
pub struct Lb {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Lb {
    /// Writes `config` (which must use `admin` as admin.listen) and starts
    /// halo-lb on it, waiting until the admin API answers and `vips` accept.
    pub async fn start(config: &str, admin: SocketAddr, vips: &[SocketAddr]) -> Lb {
        Lb::start_command(Command::new(env!("CARGO_BIN_EXE_halo-lb")), config, admin, vips).await
    }

    /// Like [`Lb::start`], with at most `nofile` open file descriptors
    /// (util-linux's `prlimit`, which execs halo-lb: the pid is halo-lb's).
    pub async fn start_with_fd_limit(config: &str, admin: SocketAddr, vips: &[SocketAddr], nofile: u32) -> Lb {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_halo-lb"));
        Lb::start_command(cmd, config, admin, vips).await
    }

    pub async fn start_command(mut cmd: Command, config: &str, admin: SocketAddr, vips: &[SocketAddr]) -> Lb {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("lb.toml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.path().join("lb.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = cmd
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,halo_lb=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lb = Lb {
            child: Some(child),
            admin,
            config_path,
            log_path,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = lb.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("halo-lb exited during start ({status}):\n{}", lb.log());
            }
            if lb.ready(vips).await {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "halo-lb not ready:\n{}", lb.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lb
    }

    /// Ready once the admin API answers: halo-lb binds every VIP listener
    /// before it serves admin requests, so the VIPs are accepting then. (Not
    /// probing the VIPs keeps readiness from adding connections to a test.)
    async fn ready(&self, vips: &[SocketAddr]) -> bool {
        let status = halo_testkit::http::get(self.admin, "/status").await;
        matches!(status, Some((200, body)) if vips.iter().all(|v| body.contains(&v.to_string())))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Replaces the config file (for a SIGHUP).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits for the process to exit and returns its status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "halo-lb did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub async fn status(&self) -> serde_json::Value {
        let (code, body) = halo_testkit::http::get(self.admin, "/status")
            .await
            .expect("/status answers");
        assert_eq!(code, 200);
        serde_json::from_str(&body).unwrap()
    }

    /// `/status` read into the crate's own types: the document has the
    /// shape `halo_lb::status` defines.
    pub async fn typed_status(&self) -> halo_lb::status::Status {
        let (code, body) = halo_testkit::http::get(self.admin, "/status")
            .await
            .expect("/status answers");
        assert_eq!(code, 200);
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/status does not match halo_lb::status::Status: {e}\n{body}"))
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if std::thread::panicking() {
                eprintln!(
                    "halo-lb log:\n{}",
                    std::fs::read_to_string(&self.log_path).unwrap_or_default()
                );
            }
            let _kill_result = child.kill();
            let _wait_result = child.wait();
        }
    }
}

/// A config with one VIP; `extra` lines go into the `[[vip]]` table.
pub fn one_vip(admin: SocketAddr, vip: SocketAddr, backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "drain_timeout = \"10s\"\n[admin]\nlisten = \"{admin}\"\n\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// Loopback addresses with fresh ports for an admin API and one VIP.
pub fn addrs() -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::from((Ipv4Addr::LOCALHOST, port())),
        SocketAddr::from((Ipv4Addr::LOCALHOST, port())),
    )
}

/// Opens a connection to `vip` every few milliseconds and records when
/// each attempt started and whether it got a greeting.
pub struct Prober {
    pub log: Arc<Mutex<Vec<(Instant, bool)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    pub fn start(vip: SocketAddr) -> Prober {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (Arc::clone(&log), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let ok = tokio::time::timeout(Duration::from_secs(2), greeting(vip))
                    .await
                    .is_ok_and(|r| r.is_ok());
                l.lock().unwrap().push((at, ok));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Prober { log, stop, task }
    }

    pub async fn stop(self) -> Vec<(Instant, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        Arc::try_unwrap(self.log).unwrap().into_inner().unwrap()
    }
}

/// Waits until a probe that started after `t` succeeded.
pub async fn served_after(log: &Arc<Mutex<Vec<(Instant, bool)>>>, t: Instant) {
    eventually(DEADLINE, "the vip to serve again", || async {
        log.lock().unwrap().iter().any(|(at, ok)| *at > t && *ok).then_some(())
    })
    .await;
}

/// The addresses in the first VIP's table, sorted.
pub async fn table_addrs(lb: &Lb) -> Vec<String> {
    let status = lb.status().await;
    let mut addrs: Vec<String> = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_owned())
        .collect();
    addrs.sort();
    addrs
}

/// The backends that greeted `n` connections to `vip`.
pub async fn served_by(vip: SocketAddr, n: usize) -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    for _ in 0..n {
        names.insert(greeting(vip).await.unwrap().0);
    }
    names
}
