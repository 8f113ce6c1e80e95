//! A tiny HTTP backend for demos: answers every request with
//! "hello from <name>" and closes. `cargo run -p halo-lb --example
//! demo-backend -- 127.0.0.1:9001 web-1`

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9001".into());
    let name = args.next().unwrap_or_else(|| addr.clone());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("demo backend {name} on {addr}");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            // One request per connection; the content does not matter.
            if stream.read(&mut buf).await.is_ok() {
                let body = format!("hello from {name}\n");
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = stream.write_all(reply.as_bytes()).await {
                    eprintln!("demo backend {name}: {e}");
                }
            }
        });
    }
}
