//! The admin HTTP API: `/health`, `/status`, `/metrics`, and the write
//! endpoints that disable or re-enable a backend by hand.
//!
//! In an HA pair both instances answer reads themselves (`/status` names
//! the role and the leader); the standby forwards writes to the active,
//! whose tables are the ones serving, as Marathon's followers proxy to
//! their leader.
//!
//! Writes pass [`halo_health::auth::authorize`] first (bearer token, or
//! loopback with `X-Halo-Request`; `Host` and `Origin` checked), on the
//! standby too before it forwards: the standby's request to the active
//! carries the pair's token and the header, and comes from the standby's
//! address, so a pair on two hosts needs a token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halo_health::auth::{AdminAuth, Grant, REQUEST_HEADER};
use halo_health::server::{json_response, metrics_response, text_response, HttpResponse};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::balance::table::{AdminError, Vip};
use crate::control::ecmp::Membership;
use crate::control::ha::{Leadership, Role};
use crate::control::server::Server;

/// Header marking a request a standby forwarded, so it is never forwarded
/// twice (both instances briefly believing the other leads).
const FORWARDED: &str = "x-halo-forwarded-by";
/// Deadline of a forwarded request.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer relayed from the active.
const MAX_FORWARDED_BODY: usize = 64 * 1024;

/// Serves the admin API on `listener` until `stop` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    leadership: Option<Arc<Leadership>>,
    membership: Option<Arc<Membership>>,
    auth: Arc<AdminAuth>,
    stop: CancellationToken,
) {
    halo_health::server::serve(listener, stop, move |req| {
        let (server, leadership, membership, auth) = (
            Arc::clone(&server),
            leadership.clone(),
            membership.clone(),
            Arc::clone(&auth),
        );
        async move { route(&server, leadership.as_deref(), membership.as_deref(), &auth, req).await }
    })
    .await;
}

async fn route(
    server: &Server,
    leadership: Option<&Leadership>,
    membership: Option<&Membership>,
    auth: &AdminAuth,
    req: Request<Incoming>,
) -> HttpResponse {
    let path = req.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut grant = None;
    if req.method() == Method::POST {
        // Every POST is a write (or a 404): checked before anything else,
        // on the standby before it forwards.
        let token = auth.token();
        match halo_health::auth::authorize(&req, token.as_ref()) {
            Ok(g) => grant = Some(g),
            Err(denied) => {
                tracing::warn!(path, client = %client(&req), status = %denied.status, reason = denied.reason, "admin write refused");
                return denied.response();
            }
        }
        if let Some(leadership) = leadership.filter(|l| l.role() != Role::Active) {
            return forward(leadership, token.as_ref(), &req).await;
        }
    }
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["health"]) => {
            let role = leadership.map(Leadership::role);
            if server.is_draining() {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "draining", "role": role}),
                )
            } else {
                json_response(StatusCode::OK, &json!({"status": "ok", "role": role}))
            }
        }
        (&Method::GET, ["status"]) => {
            let mut status = server.status();
            status.ha = leadership.map(Leadership::status);
            status.ecmp = membership.map(Membership::status);
            json_response(StatusCode::OK, &status)
        }
        (&Method::GET, ["metrics"]) => match server.render_metrics() {
            Some(text) => metrics_response(text),
            None => text_response(StatusCode::NOT_FOUND, "metrics are not enabled in this process\n"),
        },
        (&Method::POST, ["vips", vip, "backends", addr, action @ ("disable" | "enable")]) => {
            let Some(vip) = server.vip(vip) else {
                return json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": format!("no vip named {vip:?}")}),
                );
            };
            let Ok(addr) = addr.parse::<SocketAddr>() else {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": format!("{addr:?} is not ip:port")}),
                );
            };
            let grant = grant.expect("every POST was authorized above");
            set_disabled(vip, addr, *action == "disable", grant, &req).await
        }
        (_, ["health"] | ["status"] | ["metrics"]) => text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Who sent an admin request, for the log of every write.
fn client<B>(req: &Request<B>) -> String {
    halo_health::server::peer(req).map_or_else(|| "unknown".to_owned(), |p| p.to_string())
}

async fn set_disabled(
    vip: Arc<Vip>,
    addr: SocketAddr,
    disabled: bool,
    grant: Grant,
    req: &Request<Incoming>,
) -> HttpResponse {
    // Who asked: the peer, and the standby that forwarded it, if one did.
    let client = client(req);
    let forwarded_by = forwarded_by(req.headers(), grant);
    let set = vip
        .rebuild_off_timing_threads(0, move |vip| vip.set_disabled(addr, disabled))
        .await;
    let set = match set {
        Ok(set) => set,
        Err(e) => {
            tracing::error!(vip = vip.name(), backend = %addr, error = %e, "the table rebuild failed");
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "the table rebuild failed; the previous table keeps serving"}),
            );
        }
    };
    match set {
        Ok(changed) => {
            tracing::info!(vip = vip.name(), backend = %addr, disabled, changed, client = %client, auth = grant.as_str(), forwarded_by, "backend state set by operator");
            json_response(
                StatusCode::OK,
                &json!({"vip": vip.name(), "backend": addr.to_string(), "disabled": disabled, "changed": changed, "table_version": vip.table().version}),
            )
        }
        Err(e @ AdminError::UnknownBackend(_)) => {
            json_response(StatusCode::NOT_FOUND, &json!({"error": e.to_string()}))
        }
    }
}

/// Longest `X-Halo-Forwarded-By` value believed: an `ha.id`.
const MAX_FORWARDER_ID: usize = 64;

/// The standby that forwarded this write, for its log line: the
/// `X-Halo-Forwarded-By` value, believed only when the write carried the
/// pair's token (a standby forwards with it; anyone can send the header)
/// and the value looks like an `ha.id` (at most [`MAX_FORWARDER_ID`]
/// letters, digits, `-`, `_`, `.`), so a client can neither put words in
/// the audit log nor make its lines long.
fn forwarded_by(headers: &http::HeaderMap, grant: Grant) -> Option<&str> {
    if grant != Grant::Token {
        return None;
    }
    let value = headers.get(FORWARDED)?.to_str().ok()?;
    let plausible = !value.is_empty()
        && value.len() <= MAX_FORWARDER_ID
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    plausible.then_some(value)
}

/// Sends a standby's (already authorized) write request on to the active,
/// with the pair's `token` if one is configured, and relays its answer.
async fn forward(
    leadership: &Leadership,
    token: Option<&halo_health::auth::Token>,
    req: &Request<Incoming>,
) -> HttpResponse {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    if req.headers().contains_key(FORWARDED) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "forwarded to an instance that is not active either; retry shortly"}),
        );
    }
    let Some(leader) = leadership.leader_admin() else {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "this instance is the standby and no active is known; retry shortly"}),
        );
    };
    let Ok(addr) = leader.parse::<SocketAddr>() else {
        return json_response(
            StatusCode::BAD_GATEWAY,
            &json!({"error": format!("the active advertises {leader:?}, not ip:port")}),
        );
    };
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "forwarding connection ended with an error");
            }
        });
        let mut request = Request::builder()
            .method(req.method())
            .uri(&path)
            .header(http::header::HOST, leader.as_str())
            .header(FORWARDED, leadership.id())
            .header(REQUEST_HEADER, "1");
        if let Some(token) = token {
            // Checked visible ASCII when read: always a valid header value.
            let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| "the admin token cannot be sent as a header".to_owned())?;
            value.set_sensitive(true);
            request = request.header(http::header::AUTHORIZATION, value);
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        // The active's answers are a few hundred bytes; anything past the
        // cap is not one of them.
        let body = Limited::new(body, MAX_FORWARDED_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading its answer: {e}"))?
            .to_bytes();
        Ok::<_, String>(Response::from_parts(parts, Full::new(body)))
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, exchange).await {
        Ok(Ok(mut response)) => {
            tracing::info!(path, active = %addr, status = %response.status(), "write forwarded to the active");
            if let Ok(value) = http::HeaderValue::from_str(&leader) {
                response.headers_mut().insert("x-halo-forwarded-to", value);
            }
            response
        }
        Ok(Err(e)) => json_response(
            StatusCode::BAD_GATEWAY,
            &json!({"error": format!("cannot forward to the active at {addr}: {e}")}),
        ),
        Err(_) => json_response(
            StatusCode::GATEWAY_TIMEOUT,
            &json!({"error": format!("the active at {addr} did not answer in {FORWARD_TIMEOUT:?}")}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(forwarded_by: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(FORWARDED, http::HeaderValue::from_str(forwarded_by).unwrap());
        headers
    }

    /// Issue 17: any client's `X-Halo-Forwarded-By` went into the audit log.
    #[test]
    fn the_forwarder_is_believed_only_with_the_token_and_only_if_it_looks_like_an_id() {
        assert_eq!(forwarded_by(&headers("lb-b"), Grant::Token), Some("lb-b"));
        assert_eq!(forwarded_by(&headers("lb-b"), Grant::Loopback), None);
        assert_eq!(forwarded_by(&http::HeaderMap::new(), Grant::Token), None);
        let long = "b".repeat(MAX_FORWARDER_ID + 1);
        for bad in ["", "two words", "a\"b", "x=1 y=2", long.as_str(), "lb-b\u{7f}"] {
            if let Ok(value) = http::HeaderValue::from_str(bad) {
                let mut map = http::HeaderMap::new();
                map.insert(FORWARDED, value);
                assert_eq!(forwarded_by(&map, Grant::Token), None, "{bad:?}");
            }
        }
        assert_eq!(
            forwarded_by(&headers(&"b".repeat(MAX_FORWARDER_ID)), Grant::Token).map(str::len),
            Some(MAX_FORWARDER_ID)
        );
    }
}
