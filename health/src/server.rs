//! The health endpoints both binaries serve, and a small HTTP/1 server loop
//! their admin APIs share.
//!
//! - `GET /health/live`: 200 while the process runs.
//! - `GET /health/ready`: 200 if every check is passing or warning (and the
//!   process is not draining), else 503; the JSON body lists each check's
//!   status, output and time of last change.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::checker::{CheckHandle, Status};

/// The response type of every admin handler.
pub type HttpResponse = Response<Full<Bytes>>;

/// Serves HTTP/1 on `listener` with `handler` until `stop` is cancelled.
pub async fn serve<H, F>(listener: TcpListener, stop: CancellationToken, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = handler(req);
                async move { Ok::<_, Infallible>(response.await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
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

/// A JSON response with a trailing newline.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    let mut text = serde_json::to_vec_pretty(body).expect("JSON values serialize");
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
