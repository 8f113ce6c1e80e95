//! The admin HTTP API: `/health`, `/status`, `/metrics`, and the write
//! endpoints that disable or re-enable a backend by hand.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::Server;
use crate::table::{AdminError, Vip};

/// Serves the admin API on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, server: Arc<Server>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let server = Arc::clone(&server);
                async move { Ok::<_, Infallible>(route(&server, req)) }
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

fn route(server: &Server, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
            Some(text) => Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(text)))
                .expect("static response parts are valid"),
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

fn set_disabled(vip: &Vip, addr: SocketAddr, disabled: bool) -> Response<Full<Bytes>> {
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

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).expect("JSON values serialize");
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("static response parts are valid")
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .expect("static response parts are valid")
}
