//! Probes: one attempt at telling whether an app is healthy.
//!
//! Every probe is bounded in time (its deadline) and in memory: an HTTP body
//! is read only up to [`MAX_OUTPUT`] bytes, exec output is kept up to
//! [`MAX_OUTPUT`] bytes per stream, and error text copied into the output is
//! cut to [`MAX_ERROR_TEXT`] bytes. An exec probe runs in a process group of
//! its own, and the whole group is killed when the probe ends (passed,
//! failed, timed out, or dropped), so nothing it started outlives it.

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
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Most bytes of probe output kept: the whole [`ProbeResult::output`] is at
/// most this long. An HTTP body is read no further than this; an exec
/// probe's stdout and stderr are each kept up to this (the rest is read and
/// discarded while the command runs, so it never blocks on a full pipe).
pub const MAX_OUTPUT: usize = 4096;

/// Most bytes of an error's text (its whole source chain) copied into a
/// probe's output, which ends up in `/status`, `/health/ready`, Consul and
/// logs.
pub const MAX_ERROR_TEXT: usize = 512;

/// How long an exec probe keeps reading output after its command exited.
/// Output written before the exit is already in the pipes; this only waits
/// for pipes held open by something the command left running in the
/// background (`sleep 60 & echo started`), which is then killed with the
/// rest of the probe's process group. Never past the probe's deadline.
pub const EXIT_GRACE: Duration = Duration::from_millis(100);

/// Appended to output cut at [`MAX_OUTPUT`].
const TRUNCATED: &str = " …(truncated)";

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
    /// If set, the body must contain this to pass. Only the first
    /// [`MAX_OUTPUT`] bytes of the body are read and searched.
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

/// An exec probe: a command with arguments, run without a shell, in a new
/// process group that is killed (SIGKILL to the group) when the probe ends.
/// Processes that leave the group (a new session via `setsid`, or a double
/// fork into another group) are out of reach, as with Consul's script checks.
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
    ///
    /// Dropping the returned future before it completes stops the probe:
    /// its socket is closed, or its command's process group killed.
    pub async fn run(&self, probe: &Probe, timeout: Duration) -> ProbeResult {
        let start = Instant::now();
        let deadline = start + timeout;
        let (outcome, output) = match probe {
            // Exec probes keep to the deadline themselves, so that what the
            // command printed before it hung is still reported.
            Probe::Exec(p) => exec(p, timeout, deadline).await,
            Probe::Http(p) => within(deadline, timeout, self.http(p)).await,
            Probe::Tcp(addr) => within(deadline, timeout, tcp(*addr)).await,
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
            Err(e) => return (Outcome::Fail, format!("bad request: {}", error_text(&e))),
        };
        let response = match self.http.request(request).await {
            Ok(r) => r,
            Err(e) => return (Outcome::Fail, format!("{} {}: {}", p.method, p.url, error_text(&e))),
        };
        let status = response.status();
        // Read no more than we keep: an endless or huge body must cost
        // neither memory nor time. Dropping the rest closes the connection
        // (the client keeps no pool).
        let mut body = response.into_body();
        let mut kept: Vec<u8> = Vec::new();
        while kept.len() < MAX_OUTPUT {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = MAX_OUTPUT - kept.len();
                        kept.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Some(Err(e)) => {
                    return (
                        Outcome::Fail,
                        format!("HTTP {status}, body read failed: {}", error_text(&e)),
                    )
                }
            }
        }
        let body = lossy_utf8(&kept);
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

/// Runs `attempt` until `deadline`; past it, a failure naming `timeout`.
async fn within(
    deadline: Instant,
    timeout: Duration,
    attempt: impl std::future::Future<Output = (Outcome, String)>,
) -> (Outcome, String) {
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(r) => r,
        // Dropping the attempt closes its socket.
        Err(_) => (Outcome::Fail, format!("timed out after {timeout:?}")),
    }
}

async fn tcp(addr: SocketAddr) -> (Outcome, String) {
    match TcpStream::connect(addr).await {
        Ok(_) => (Outcome::Pass, format!("TCP connect {addr}: success")),
        Err(e) => (Outcome::Fail, format!("TCP connect {addr}: {}", error_text(&e))),
    }
}

async fn exec(p: &ExecProbe, timeout: Duration, deadline: Instant) -> (Outcome, String) {
    let Some((program, args)) = p.command.split_first() else {
        return (Outcome::Fail, "empty command".into());
    };
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own (pgid = the child's pid), so that everything
        // it starts can be killed together.
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (Outcome::Fail, format!("cannot run {program}: {}", error_text(&e))),
    };
    // Declared after `child`, so dropped before it: if this future is
    // dropped mid-run, the group is killed while the child is unreaped and
    // its pid (the pgid) cannot have been reused. On the normal path the
    // group is killed after the child was reaped; the pgid then stays
    // allocated for as long as any member lives, and an empty group just
    // gives ESRCH.
    let mut group = ProcessGroup::of(&child);
    let mut stdout = Pipe::new(child.stdout.take());
    let mut stderr = Pipe::new(child.stderr.take());

    let status = {
        let wait = child.wait();
        tokio::pin!(wait);
        // Read both pipes while the command runs, until it exits or the
        // deadline passes.
        let status = loop {
            tokio::select! {
                status = &mut wait => break Some(status),
                () = stdout.read_some(), if stdout.is_open() => {}
                () = stderr.read_some(), if stderr.is_open() => {}
                () = tokio::time::sleep_until(deadline) => break None,
            }
        };
        if status.is_some() {
            // The command exited. Its output is in the pipes; EOF comes at
            // once unless something it left behind holds them open, and
            // that is not worth waiting for.
            let grace = (Instant::now() + EXIT_GRACE).min(deadline);
            while stdout.is_open() || stderr.is_open() {
                tokio::select! {
                    () = stdout.read_some(), if stdout.is_open() => {}
                    () = stderr.read_some(), if stderr.is_open() => {}
                    () = tokio::time::sleep_until(grace) => break,
                }
            }
        }
        status
    };
    // Whatever the command left running dies with the probe.
    group.kill();

    let mut output = lossy_utf8(&stdout.kept);
    if !stderr.kept.is_empty() {
        if !output.is_empty() && !output.ends_with('\n') {
            output.push('\n');
        }
        output.push_str(&lossy_utf8(&stderr.kept));
    }
    let output = output.trim_end();
    match status {
        None if output.is_empty() => (Outcome::Fail, format!("timed out after {timeout:?}")),
        None => (
            Outcome::Fail,
            format!("timed out after {timeout:?}; output so far: {output}"),
        ),
        Some(Ok(s)) => match s.code() {
            Some(0) => (Outcome::Pass, output.to_owned()),
            Some(1) => (Outcome::Warn, output.to_owned()),
            Some(code) => (Outcome::Fail, format!("exit {code}: {output}")),
            None => (Outcome::Fail, format!("killed by a signal ({s}): {output}")),
        },
        Some(Err(e)) => (Outcome::Fail, format!("waiting for {program}: {}", error_text(&e))),
    }
}

/// An exec probe's process group, killed with SIGKILL when [`kill`]ed or
/// dropped (a probe future dropped mid-run kills the group too).
///
/// [`kill`]: ProcessGroup::kill
#[derive(Debug)]
struct ProcessGroup {
    pgid: Option<Pid>,
}

impl ProcessGroup {
    /// The group `child` leads (it was spawned with `process_group(0)`).
    fn of(child: &Child) -> Self {
        // `id()` is `Some` until the child has been reaped; it was just
        // spawned. A pid always fits in an i32 (pid_t).
        let pgid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
        ProcessGroup { pgid }
    }

    fn kill(&mut self) {
        let Some(pgid) = self.pgid.take() else { return };
        match killpg(pgid, Signal::SIGKILL) {
            // ESRCH: the group is already empty.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                metrics::counter!("halo_probe_kill_errors_total").increment(1);
                tracing::warn!(pgid = pgid.as_raw(), error = %e, "cannot kill an exec probe's process group");
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One output pipe of an exec probe: read until EOF, keeping the first
/// [`MAX_OUTPUT`] bytes.
struct Pipe<R> {
    pipe: Option<R>,
    kept: Vec<u8>,
}

impl<R: AsyncReadExt + Unpin> Pipe<R> {
    fn new(pipe: Option<R>) -> Self {
        Pipe { pipe, kept: Vec::new() }
    }

    fn is_open(&self) -> bool {
        self.pipe.is_some()
    }

    /// Reads once, keeping what fits. Cancel-safe: nothing is lost if the
    /// future is dropped before it completes (`read` is cancel-safe and the
    /// bytes are stored before it returns).
    async fn read_some(&mut self) {
        let Some(pipe) = self.pipe.as_mut() else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 4096];
        match pipe.read(&mut buf).await {
            // EOF, or a pipe that cannot be read (nothing more will come).
            Ok(0) | Err(_) => self.pipe = None,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(self.kept.len());
                self.kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// `bytes` as text: invalid UTF-8 replaced, and a multi-byte character cut
/// off at the end (by a byte cap) dropped rather than shown as garbage.
fn lossy_utf8(bytes: &[u8]) -> String {
    let complete = match std::str::from_utf8(bytes) {
        Ok(_) => bytes,
        // `error_len() == None`: the input ends inside a character.
        Err(e) if e.error_len().is_none() => &bytes[..e.valid_up_to()],
        Err(_) => bytes,
    };
    String::from_utf8_lossy(complete).into_owned()
}

/// An error and its sources ("client error (Connect): tcp connect error:
/// Connection refused"), cut to [`MAX_ERROR_TEXT`] bytes.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // Some errors repeat their source in their own text.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        if text.len() > MAX_ERROR_TEXT {
            break;
        }
        source = s.source();
    }
    cut(text, MAX_ERROR_TEXT)
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max.saturating_sub(TRUNCATED.len());
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str(TRUNCATED);
    }
    s
}

fn truncate(s: String) -> String {
    cut(s, MAX_OUTPUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutting_keeps_within_the_cap_on_a_character_boundary() {
        let s = "é".repeat(MAX_OUTPUT); // two bytes each
        let t = truncate(s);
        assert!(t.len() <= MAX_OUTPUT, "{}", t.len());
        assert!(t.ends_with(TRUNCATED));
        assert_eq!(truncate("short".into()), "short");
        let exact = "x".repeat(MAX_OUTPUT);
        assert_eq!(truncate(exact.clone()), exact, "at the cap is not over it");
    }

    #[test]
    fn a_character_split_by_a_byte_cap_is_dropped() {
        let bytes = "aé".as_bytes();
        assert_eq!(lossy_utf8(&bytes[..2]), "a");
        assert_eq!(lossy_utf8(bytes), "aé");
        assert_eq!(lossy_utf8(b"a\xffb"), "a\u{fffd}b", "invalid bytes inside are replaced");
    }

    #[test]
    fn error_text_includes_sources_and_is_capped() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = std::io::Error::other(inner);
        assert!(error_text(&outer).contains("refused"));
        let long = std::io::Error::other("x".repeat(100_000));
        let text = error_text(&long);
        assert!(text.len() <= MAX_ERROR_TEXT, "{}", text.len());
    }
}
