//! Probes: one attempt at telling whether an app is healthy.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

/// Most bytes of probe output kept (HTTP body, exec stdout+stderr).
pub const MAX_OUTPUT: usize = 4096;

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Healthy.
    Pass,
    /// Degraded but serving (exec exit 1).
    Warn,
    /// Not healthy, or no answer in time.
    Fail,
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Pass, warn or fail.
    pub outcome: Outcome,
    /// What the probe saw, truncated to [`MAX_OUTPUT`] bytes.
    pub output: String,
    /// How long the probe took.
    pub latency: Duration,
}

/// An HTTP probe.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    /// URL to request (http only).
    pub url: Uri,
    /// Method; GET unless set.
    pub method: Method,
    /// Extra request headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Statuses that pass; others fail.
    pub expect_status: RangeInclusive<u16>,
    /// If set, the body must contain this to pass.
    pub expect_body: Option<String>,
}

/// Parses `"200"` or `"200-399"` into a range of HTTP statuses (each within
/// 100..=599, low ≤ high); `None` if it is neither.
pub fn parse_status_range(s: &str) -> Option<RangeInclusive<u16>> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = s.trim().parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some(lo..=hi)
}

/// An exec probe: a command with arguments, run without a shell.
#[derive(Debug, Clone)]
pub struct ExecProbe {
    /// Program and arguments.
    pub command: Vec<String>,
}

/// Something that can be probed.
#[derive(Debug, Clone)]
pub enum Probe {
    /// An HTTP request whose status (and optionally body) decides.
    Http(HttpProbe),
    /// A TCP connect.
    Tcp(SocketAddr),
    /// A command: exit 0 passes, 1 warns, anything else fails.
    Exec(ExecProbe),
}

/// Runs probes; holds the HTTP client so connections are set up once.
#[derive(Debug, Clone)]
pub struct Prober {
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Prober {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Prober {
            // No pooling: each probe makes a fresh connection, as a new
            // client of the app would.
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector),
        }
    }
}

impl Prober {
    /// Runs `probe` once with a deadline of `timeout`. Never errors: every
    /// failure is a [`Outcome::Fail`] with its reason as output.
    pub async fn run(&self, probe: &Probe, timeout: Duration) -> ProbeResult {
        let start = Instant::now();
        let attempt = async {
            match probe {
                Probe::Http(p) => self.http(p).await,
                Probe::Tcp(addr) => tcp(*addr).await,
                Probe::Exec(p) => exec(p).await,
            }
        };
        let (outcome, output) = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            // Dropping the attempt drops the child (kill_on_drop) or socket.
            Err(_) => (Outcome::Fail, format!("timed out after {timeout:?}")),
        };
        ProbeResult {
            outcome,
            output: truncate(output),
            latency: start.elapsed(),
        }
    }

    async fn http(&self, p: &HttpProbe) -> (Outcome, String) {
        let mut request = Request::builder()
            .method(p.method.clone())
            .uri(p.url.clone())
            .header(http::header::USER_AGENT, "halo-health");
        for (k, v) in &p.headers {
            request = request.header(k, v);
        }
        let request = match request.body(Full::new(Bytes::new())) {
            Ok(r) => r,
            Err(e) => return (Outcome::Fail, format!("bad request: {e}")),
        };
        let response = match self.http.request(request).await {
            Ok(r) => r,
            Err(e) => return (Outcome::Fail, format!("{} {}: {e}", p.method, p.url)),
        };
        let status = response.status();
        let body = match response.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return (Outcome::Fail, format!("HTTP {status}, body read failed: {e}")),
        };
        let body = String::from_utf8_lossy(&body);
        let summary = format!("HTTP {} {}: {}; {}", p.method, p.url, status, body.trim());
        if !p.expect_status.contains(&status.as_u16()) {
            return (Outcome::Fail, summary);
        }
        if let Some(needle) = &p.expect_body {
            if !body.contains(needle.as_str()) {
                return (Outcome::Fail, format!("body lacks {needle:?}; {summary}"));
            }
        }
        (Outcome::Pass, summary)
    }
}

async fn tcp(addr: SocketAddr) -> (Outcome, String) {
    match TcpStream::connect(addr).await {
        Ok(_) => (Outcome::Pass, format!("TCP connect {addr}: success")),
        Err(e) => (Outcome::Fail, format!("TCP connect {addr}: {e}")),
    }
}

async fn exec(p: &ExecProbe) -> (Outcome, String) {
    let Some((program, args)) = p.command.split_first() else {
        return (Outcome::Fail, "empty command".into());
    };
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (Outcome::Fail, format!("cannot run {program}: {e}")),
    };
    // Read both pipes while waiting, keeping at most MAX_OUTPUT of each.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (out, err, status) = tokio::join!(read_capped(&mut stdout), read_capped(&mut stderr), child.wait());
    let mut output = String::from_utf8_lossy(&out).into_owned();
    if !err.is_empty() {
        if !output.is_empty() && !output.ends_with('\n') {
            output.push('\n');
        }
        output.push_str(&String::from_utf8_lossy(&err));
    }
    let output = output.trim_end().to_owned();
    match status {
        Ok(s) => match s.code() {
            Some(0) => (Outcome::Pass, output),
            Some(1) => (Outcome::Warn, output),
            Some(code) => (Outcome::Fail, format!("exit {code}: {output}")),
            None => (Outcome::Fail, format!("killed by a signal ({s}): {output}")),
        },
        Err(e) => (Outcome::Fail, format!("waiting for {program}: {e}")),
    }
}

/// Reads a pipe to its end, keeping the first [`MAX_OUTPUT`] bytes (draining
/// the rest so the child never blocks on a full pipe).
async fn read_capped(pipe: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_OUTPUT {
        let mut cut = MAX_OUTPUT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" …(truncated)");
    }
    s
}
