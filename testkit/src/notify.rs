//! A stand-in for systemd's notification socket: the datagram socket a
//! `Type=notify` unit's process finds in `NOTIFY_SOCKET`, so tests can read
//! what a real halo process tells its service manager.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A bound notification socket in a directory of its own, removed on drop.
#[derive(Debug)]
pub struct NotifySocket {
    socket: Arc<UnixDatagram>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    /// Binds a fresh socket.
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notification socket");
        NotifySocket {
            socket: Arc::new(socket),
            path,
            _dir: dir,
        }
    }

    /// The path to pass as `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next message (one datagram, e.g. `"READY=1\nSTATUS=serving"`),
    /// waiting up to `timeout`; panics if none arrives.
    pub async fn next(&self, timeout: Duration) -> String {
        let socket = Arc::clone(&self.socket);
        tokio::task::spawn_blocking(move || {
            socket.set_read_timeout(Some(timeout)).expect("set the read timeout");
            let mut buf = [0u8; 1024];
            let n = socket.recv(&mut buf).expect("a notification within the deadline");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .await
        .expect("the reading task")
    }

    /// Reads messages until one contains `needle`, and returns it.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        loop {
            let message = self.next(timeout).await;
            if message.contains(needle) {
                return message;
            }
        }
    }
}
