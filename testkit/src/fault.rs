//! A TCP fault proxy: sits between a process and a real server (a Consul
//! agent) and can cut the path like a network partition.
//!
//! When cut, nothing is relayed either way, but no connection is closed:
//! requests in flight hang, and new connections are accepted and left
//! unanswered, the way a partition looks to the client (timeouts, not
//! refusals). [`FaultProxy::restore`] closes everything held during the cut,
//! so the client reconnects, and relays again.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A proxy to one target; it stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    /// Bumped by [`FaultProxy::restore`]: held connections are closed.
    release: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and relays to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        let addr = listener.local_addr().expect("the fault proxy's address");
        let (cut, cut_rx) = watch::channel(false);
        let (release, release_rx) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(relay(client, target, cut_rx.clone(), release_rx.clone()));
            }
        });
        FaultProxy {
            addr,
            cut,
            release,
            task,
        }
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://` URL of [`FaultProxy::addr`].
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts the path: nothing more gets through, in either direction.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Heals the path: held connections are closed, new ones relayed.
    pub fn restore(&self) {
        self.cut.send_replace(false);
        self.release.send_modify(|n| *n += 1);
    }

    /// Heals the path for new connections only: those held during the cut
    /// stay open and silent (until [`FaultProxy::restore`]), like a request
    /// a partition left hanging in an agent after the network came back.
    pub fn heal_new_only(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Relays end with the watch sender: they see it closed.
    }
}

async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    mut cut: watch::Receiver<bool>,
    mut release: watch::Receiver<u64>,
) {
    release.borrow_and_update();
    if !*cut.borrow_and_update() {
        let Ok(mut server) = TcpStream::connect(target).await else {
            return;
        };
        tokio::select! {
            _copied = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
            () = wait_for(&mut cut, true) => {}
        }
        // Cut mid-connection: drop the server side, hold the client's.
    }
    // Hold the client's connection open and silent until the path is
    // restored (or the proxy is gone).
    let _closed = release.changed().await;
    drop(client);
}

/// Waits until the cut state is `want` (or the proxy is gone).
async fn wait_for(cut: &mut watch::Receiver<bool>, want: bool) {
    while *cut.borrow_and_update() != want {
        if cut.changed().await.is_err() {
            return;
        }
    }
}
