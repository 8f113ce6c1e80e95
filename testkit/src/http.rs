//! A minimal HTTP/1.0 GET for readiness polling. The testkit stays free of
//! the client under test.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs `path` from `addr`; `None` on any failure or after 2 s.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    request(addr, "GET", path).await
}

/// GETs `path` from `addr` sending `token` as `X-Consul-Token`; `None` on
/// any failure or after 2 s.
pub async fn get_with_token(addr: SocketAddr, path: &str, token: &str) -> Option<(u16, String)> {
    let stream = connect(addr).await?;
    exchange(stream, addr, "GET", path, &format!("X-Consul-Token: {token}\r\n"), "").await
}

/// Sends `method path` with `body` and `token` as `X-Consul-Token` to
/// `addr`, e.g. to create ACL policies and tokens with a master token; the
/// status and body, `None` on any failure or after 2 s.
pub async fn request_with_token(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> Option<(u16, String)> {
    let stream = connect(addr).await?;
    exchange(
        stream,
        addr,
        method,
        path,
        &format!("X-Consul-Token: {token}\r\n"),
        body,
    )
    .await
}

/// Sends a body-less `method` request for `path` to `addr` and returns the
/// status and body; `None` on any failure or after 2 s.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let stream = connect(addr).await?;
    request_over(stream, addr, method, path).await
}

/// A write to a halo admin API at `addr` the way halo's own clients make
/// it without a token: `POST path` with `X-Halo-Request: 1`. The status
/// and body; `None` on any failure or after 2 s.
pub async fn admin_post(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    request_with_headers(addr, "POST", path, &[("X-Halo-Request", "1")]).await
}

/// Sends a body-less `method` request for `path` to `addr` with extra
/// `headers` (`(name, value)`; a `Host` among them replaces the default
/// one), and returns the status and body; `None` on any failure or after
/// 2 s.
pub async fn request_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let stream = connect(addr).await?;
    request_with_headers_over(stream, addr, method, path, headers).await
}

/// [`request_with_headers`] over a connection the caller made (e.g. from
/// inside a network namespace).
pub async fn request_with_headers_over(
    stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    let lines: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    exchange(stream, addr, method, path, &lines, "").await
}

async fn connect(addr: SocketAddr) -> Option<TcpStream> {
    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()
}

/// [`request`] over a connection the caller made (e.g. from inside a
/// network namespace).
pub async fn request_over(stream: TcpStream, addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    exchange(stream, addr, method, path, "", "").await
}

/// [`request_over`] with a request body (e.g. a KV value).
pub async fn request_body_over(
    stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, String)> {
    exchange(stream, addr, method, path, "", body).await
}

/// One HTTP/1.0 exchange; `headers` are extra header lines, each ending in
/// CRLF.
async fn exchange(
    mut stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> Option<(u16, String)> {
    let exchange = async {
        let has_host = headers
            .lines()
            .any(|l| l.split_once(':').is_some_and(|(k, _)| k.eq_ignore_ascii_case("host")));
        let host = if has_host {
            String::new()
        } else {
            format!("Host: {addr}\r\n")
        };
        let request = format!(
            "{method} {path} HTTP/1.0\r\n{host}{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange).await.ok()?
}
