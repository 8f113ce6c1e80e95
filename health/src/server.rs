//! The health endpoints both binaries serve, and a small HTTP/1 server loop
//! their admin APIs share. The loop bounds what clients can hold
//! ([`ServerLimits`]): a deadline for request headers, an idle timeout, a
//! lifetime per connection and a cap on concurrent connections.
//!
//! - `GET /health/live`: 200 while the process runs.
//! - `GET /health/ready`: 200 if every check is passing or warning (and the
//!   process is not draining), else 503; the JSON body lists each check's
//!   status, output and time of last change.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checker::{CheckHandle, Status};

/// The response type of every admin handler.
pub type HttpResponse = Response<Full<Bytes>>;

/// Limits of the admin server loop, so that slow or idle clients cannot
/// hold connections (and file descriptors) without bound. Durations longer
/// than a year are taken as a year.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Deadline for a request's headers, from when the server starts
    /// reading them (a new connection, or the next request on a kept-alive
    /// one) to the end of the header block. A client trickling headers
    /// (slowloris) is cut off when it passes. Default
    /// [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// A connection on which no byte moved either way for this long is
    /// closed: an idle keep-alive client, or one that stopped reading its
    /// response. Handlers must answer well within it. Default
    /// [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// Longest a connection lives, however busy: past it the server closes
    /// it after the response in progress (HTTP/1 graceful shutdown), and
    /// drops it outright [`LIFETIME_GRACE`] later. Default
    /// [`DEFAULT_MAX_LIFETIME`].
    pub max_lifetime: Duration,
    /// Most connections served at once. Beyond it the loop stops accepting,
    /// so further clients wait in the kernel's listen backlog and the
    /// process holds no descriptor for them; keep it well below the
    /// process's fd budget so the admin side can never starve the data
    /// plane. At least 1 (0 is taken as 1). Default
    /// [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
}

/// Default [`ServerLimits::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`ServerLimits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`ServerLimits::max_lifetime`].
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(300);
/// Default [`ServerLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// How long a connection past its [`ServerLimits::max_lifetime`] may take to
/// finish its response before it is dropped.
pub const LIFETIME_GRACE: Duration = Duration::from_secs(5);

/// Longest any [`ServerLimits`] duration is taken to be, so deadlines
/// computed from them cannot overflow.
const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

impl ServerLimits {
    /// These limits with durations cut to a year and the cap raised to 1.
    fn clamped(self) -> Self {
        ServerLimits {
            header_read_timeout: self.header_read_timeout.min(LONGEST),
            idle_timeout: self.idle_timeout.min(LONGEST),
            max_lifetime: self.max_lifetime.min(LONGEST),
            max_connections: self.max_connections.max(1),
        }
    }
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Serves HTTP/1 on `listener` with `handler` until `stop` is cancelled,
/// with the default [`ServerLimits`].
pub async fn serve<H, F>(listener: TcpListener, stop: CancellationToken, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    serve_with(listener, stop, ServerLimits::default(), handler).await;
}

/// Serves HTTP/1 on `listener` with `handler` until `stop` is cancelled,
/// within `limits`. Connections already accepted when `stop` is cancelled
/// run on until they end (their limits bound that).
pub async fn serve_with<H, F>(listener: TcpListener, stop: CancellationToken, limits: ServerLimits, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let limits = limits.clamped();
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut permit = None;
    let mut last_accept_warning: Option<Instant> = None;
    let mut held_back = 0u64;
    loop {
        // A slot first, then accept: at the cap, clients wait in the
        // backlog instead of costing a descriptor here.
        let slot = match permit.take() {
            Some(p) => p,
            None => tokio::select! {
                () = stop.cancelled() => return,
                p = Arc::clone(&slots).acquire_owned() => p.expect("the semaphore is never closed"),
            },
        };
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends repeat every 20 ms while they last:
                    // log once a second with the count held back.
                    if last_accept_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(error = %e, held_back, "admin accept failed");
                        last_accept_warning = Some(Instant::now());
                        held_back = 0;
                    } else {
                        held_back += 1;
                    }
                    permit = Some(slot);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let (stream, peer) = stream;
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            serve_connection(stream, peer, limits, handler).await;
            drop(slot);
        });
    }
}

/// The client address of an admin request, in its extensions: handlers log
/// it with every write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// The client address of `req`, if the serve loop recorded it.
pub fn peer<B>(req: &Request<B>) -> Option<SocketAddr> {
    req.extensions().get::<Peer>().map(|p| p.0)
}

/// Serves one connection within `limits`.
async fn serve_connection<H, F>(stream: TcpStream, peer: SocketAddr, limits: ServerLimits, handler: Arc<H>)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let opened = Instant::now();
    let activity = Arc::new(Activity::new(opened));
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let service = service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(Peer(peer));
        let response = handler(req);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let retire = opened + limits.max_lifetime;
    let mut retiring = false;
    loop {
        let idle_until = activity.last() + limits.idle_timeout;
        let lifetime_until = if retiring { retire + LIFETIME_GRACE } else { retire };
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(idle_until) => {
                // Bytes may have moved since the deadline was computed.
                if activity.last() + limits.idle_timeout <= Instant::now() {
                    tracing::debug!(idle = ?limits.idle_timeout, "closing an idle admin connection");
                    return;
                }
            }
            () = tokio::time::sleep_until(lifetime_until) => {
                if retiring {
                    tracing::debug!("dropping an admin connection past its lifetime");
                    return;
                }
                conn.as_mut().graceful_shutdown();
                retiring = true;
            }
        }
    }
}

/// When bytes last moved on a connection.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Milliseconds from `opened` to the last read or write that moved bytes.
    last_ms: AtomicU64,
}

impl Activity {
    fn new(opened: Instant) -> Self {
        Activity {
            opened,
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that records in [`Activity`] when bytes last moved through it.
#[derive(Debug)]
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Answers `/health/live` and `/health/ready`; `None` for other paths.
/// `draining` makes readiness fail whatever the checks say.
pub fn health_endpoints(method: &Method, path: &str, checks: &[CheckHandle], draining: bool) -> Option<HttpResponse> {
    match (method, path.trim_end_matches('/')) {
        (&Method::GET, "/health/live") => Some(json_response(StatusCode::OK, &json!({"status": "live"}))),
        (&Method::GET, "/health/ready") => {
            let (ready, body) = readiness(checks, draining);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Some(json_response(status, &body))
        }
        (_, "/health/live" | "/health/ready") => Some(text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")),
        _ => None,
    }
}

/// Whether the process is ready, and the JSON that says why.
pub fn readiness(checks: &[CheckHandle], draining: bool) -> (bool, serde_json::Value) {
    let mut ready = !draining;
    let list: Vec<serde_json::Value> = checks
        .iter()
        .map(|c| {
            let s = c.state();
            if s.status == Status::Critical {
                ready = false;
            }
            json!({
                "name": c.name(),
                "status": s.status,
                "output": s.output,
                "since": rfc3339(s.since),
                "probes": s.probes,
            })
        })
        .collect();
    let body = json!({
        "status": if ready { "ready" } else if draining { "draining" } else { "not ready" },
        "draining": draining,
        "checks": list,
    });
    (ready, body)
}

/// A JSON response with a trailing newline. `body` is a JSON value or a
/// plain serde struct (string keys, no custom serializer that can fail).
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> HttpResponse {
    let mut text = serde_json::to_vec_pretty(body).expect("plain JSON documents serialize");
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("static response parts are valid")
}

/// A plain-text response.
pub fn text_response(status: StatusCode, text: impl Into<Bytes>) -> HttpResponse {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(text.into()))
        .expect("static response parts are valid")
}

/// Prometheus text exposition.
pub fn metrics_response(text: String) -> HttpResponse {
    Response::builder()
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(text)))
        .expect("static response parts are valid")
}

/// RFC 3339 UTC timestamp with seconds precision, without a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            "2026-11-18T11:06:40Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
