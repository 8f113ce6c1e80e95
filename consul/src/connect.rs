//! How the pool reaches the agent: TCP (plain or TLS, through hyper-rustls)
//! or a unix socket. hyper-util has no unix connector; this one is a small
//! tower `Service` that ignores the request's URI and dials the socket path.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The pool's connector.
#[derive(Clone)]
pub(crate) enum Connector {
    /// `http://` or `https://` to a host and port.
    Net(HttpsConnector<HttpConnector>),
    /// `unix:///path`: every connection dials this socket.
    Unix(Arc<PathBuf>),
}

/// One connection made by [`Connector`].
pub(crate) enum Stream {
    /// Boxed: a TLS stream is over a kilobyte, a unix one 40 bytes.
    Net(Box<MaybeHttpsStream<TokioIo<TcpStream>>>),
    Unix(TokioIo<UnixStream>),
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Net(https) => https.poll_ready(cx),
            Connector::Unix(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self {
            Connector::Net(https) => {
                let connecting = https.call(uri);
                Box::pin(async move { connecting.await.map(|s| Stream::Net(Box::new(s))) })
            }
            Connector::Unix(path) => {
                let path = Arc::clone(path);
                Box::pin(async move {
                    let stream = UnixStream::connect(path.as_path()).await.map_err(|e| {
                        Box::new(io::Error::new(e.kind(), format!("unix socket {}: {e}", path.display()))) as BoxError
                    })?;
                    Ok(Stream::Unix(TokioIo::new(stream)))
                })
            }
        }
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Net(s) => s.connected(),
            Stream::Unix(_) => Connected::new(),
        }
    }
}

// Both variants are Unpin (TcpStream, UnixStream and rustls' stream are), so
// pinning is plain delegation.
impl Read for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Net(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Net(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Net(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Net(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
