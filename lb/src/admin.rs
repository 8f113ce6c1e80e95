//! The admin HTTP API: `/health`, `/status`, `/metrics`, and the write
//! endpoints that disable or re-enable a backend by hand.

use std::net::SocketAddr;
use std::sync::Arc;

use halo_health::server::{json_response, metrics_response, text_response, HttpResponse};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Server;
use crate::table::{AdminError, Vip};

/// Serves the admin API on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, server: Arc<Server>, stop: CancellationToken) {
    halo_health::server::serve(listener, stop, move |req| {
        let response = route(&server, req);
        async move { response }
    })
    .await;
}

fn route(server: &Server, req: Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["health"]) => {
            if server.is_draining() {
                json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "draining"}))
            } else {
                json_response(StatusCode::OK, &json!({"status": "ok"}))
            }
        }
        (&Method::GET, ["status"]) => json_response(StatusCode::OK, &server.status()),
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
            set_disabled(&vip, addr, *action == "disable")
        }
        (_, ["health"] | ["status"] | ["metrics"]) => text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn set_disabled(vip: &Vip, addr: SocketAddr, disabled: bool) -> HttpResponse {
    match vip.set_disabled(addr, disabled) {
        Ok(changed) => {
            tracing::info!(vip = vip.name(), backend = %addr, disabled, changed, "backend state set by operator");
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
