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

/// Sends a body-less `method` request for `path` to `addr` and returns the
/// status and body; `None` on any failure or after 2 s.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    request_over(stream, addr, method, path).await
}

/// [`request`] over a connection the caller made (e.g. from inside a
/// network namespace).
pub async fn request_over(mut stream: TcpStream, addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
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
