//! Living under a service manager: systemd's readiness protocol, and the
//! `healthcheck` a container runtime runs inside an image that has no curl.
//!
//! # Readiness (`sd_notify(3)`)
//!
//! Under a `Type=notify` unit, systemd names a datagram socket in
//! `NOTIFY_SOCKET` and waits for `READY=1` before it counts the service as
//! started (and before `systemctl start` returns). The protocol is one
//! datagram of `KEY=value` lines per message, so it is done here in a few
//! lines rather than with a crate. Outside systemd `NOTIFY_SOCKET` is unset
//! and every call is a no-op. A failed send is logged and otherwise
//! ignored: systemd then reports the start as timed out, which is the
//! right outcome for a manager that cannot hear us.
//!
//! With `WatchdogSec=` set, systemd also passes `WATCHDOG_USEC` and expects
//! `WATCHDOG=1` at least that often; [`spawn_watchdog`] pings at half the
//! interval from the runtime it is spawned on, so a wedged runtime stops
//! the pings and systemd restarts the process.
//!
//! # Health check from inside an image
//!
//! [`healthcheck`] makes one `GET` to the program's own admin API with a
//! deadline, and says whether it answered 2xx: what `curl -f` would do, in
//! a binary that is already in the image.

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// Sends `state` (e.g. `"READY=1"`) to the service manager. `Ok(false)`
/// when there is none (`NOTIFY_SOCKET` unset).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => notify_to(&socket, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the notification socket `socket`: a path, or `@name`
/// for an abstract socket.
pub fn notify_to(socket: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    match socket.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sender.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sender.send_to(state.as_bytes(), socket)?;
        }
    }
    Ok(())
}

/// [`notify`], logging a failure instead of returning it.
pub fn notify_or_log(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!(state, "told the service manager"),
        Ok(false) => {}
        Err(e) => tracing::warn!(state, error = %e, "cannot tell the service manager (NOTIFY_SOCKET)"),
    }
}

/// `READY=1` with a status line for `systemctl status`.
pub fn ready(status: &str) {
    notify_or_log(&format!("READY=1\nSTATUS={status}"));
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    notify_or_log(&format!("STOPPING=1\nSTATUS={status}"));
}

/// The watchdog interval systemd asks for, if it asks this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval from the current runtime, if
/// systemd asked for one.
pub fn spawn_watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tracing::info!(?interval, "systemd watchdog on: pinging at half the interval");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            notify_or_log("WATCHDOG=1");
        }
    });
}

/// Why [`off_thread`] has no result.
#[derive(Debug, thiserror::Error)]
pub enum OffThreadError {
    /// No thread could be started.
    #[error("cannot start a thread: {0}")]
    Spawn(io::Error),
    /// The work did not finish within the deadline; it is left running on
    /// its thread (nothing can interrupt a blocked system call), and its
    /// result will be dropped.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The work panicked.
    #[error("the work panicked")]
    Panicked,
}

/// Runs `work` (file reads that may hang: a hung NFS or FUSE mount) on a
/// thread of its own named `name`, and waits at most `deadline` for it
/// without blocking the runtime, so that signals and the admin API stay
/// served meanwhile.
///
/// A detached thread rather than `spawn_blocking`: a runtime waits for its
/// blocking tasks when it shuts down, so one that never returns would hold
/// the process's exit after SIGTERM; a detached thread does not.
pub async fn off_thread<T: Send + 'static>(
    name: &str,
    deadline: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OffThreadError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // The waiter may have given up (deadline passed): nothing to do.
            if tx.send(work()).is_err() {
                tracing::debug!("a result came after its deadline; dropped");
            }
        })
        .map_err(OffThreadError::Spawn)?;
    match tokio::time::timeout(deadline, rx).await {
        Ok(Ok(value)) => Ok(value),
        // The sender was dropped without a send: the work panicked.
        Ok(Err(_)) => Err(OffThreadError::Panicked),
        Err(_) => Err(OffThreadError::TimedOut(deadline)),
    }
}

/// The address to reach a server listening on `listen`: a wildcard listen
/// address is reached on loopback.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from((Ipv4Addr::LOCALHOST, listen.port())),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::from((Ipv6Addr::LOCALHOST, listen.port())),
        _ => listen,
    }
}

/// Largest answer [`http()`] reads.
const MAX_ANSWER: u64 = 64 * 1024;

/// One HTTP/1.1 request to `addr` with a deadline for the whole exchange:
/// the status code and the body (at most 64 KiB). For the command-line
/// tools that talk to the program's own admin API.
pub fn http(addr: SocketAddr, method: &str, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    http_with(addr, method, path, &[], timeout)
}

/// [`http`](fn@http) with extra request headers (`(name, value)`, e.g. a write's
/// `X-Halo-Request` and `Authorization`). Neither is echoed anywhere.
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let no_answer = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from {addr} within {timeout:?}"),
        )
    };
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(no_answer)
    };
    // A socket deadline passing shows as EAGAIN ("Resource temporarily
    // unavailable") or ETIMEDOUT: say what it means.
    let timed_out = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => no_answer(),
        _ => e,
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?).map_err(timed_out)?;
    stream.set_write_timeout(Some(left()?))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(timed_out)?;
    let mut answer = Vec::new();
    let mut limited = (&mut stream).take(MAX_ANSWER);
    let mut buf = [0u8; 4096];
    loop {
        limited.get_ref().set_read_timeout(Some(left()?))?;
        match limited.read(&mut buf).map_err(timed_out)? {
            0 => break,
            n => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .lines()
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{addr} did not answer HTTP")))?;
    Ok((code, body.to_owned()))
}

/// The `healthcheck` subcommand: `GET path` on the admin API at `listen`
/// within `timeout`. Exit code 0 for a 2xx answer, 1 for anything else,
/// with one line on stderr saying what was seen.
pub fn healthcheck(program: &str, listen: SocketAddr, path: &str, timeout: Duration) -> std::process::ExitCode {
    let addr = local_address(listen);
    match http(addr, "GET", path, timeout) {
        Ok((code, _)) if (200..300).contains(&code) => std::process::ExitCode::SUCCESS,
        Ok((code, body)) => {
            eprintln!("{program}: http://{addr}{path} answered {code}: {}", body.trim());
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{program}: http://{addr}{path}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("halo-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[tokio::test]
    async fn off_thread_work_has_a_deadline() {
        let v = off_thread("t-quick", Duration::from_secs(5), || 42).await.unwrap();
        assert_eq!(v, 42);
        // A read that never ends (here: a FIFO opened the old, blocking way,
        // with no writer) does not hold the caller past the deadline.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let started = Instant::now();
        let e = off_thread("t-stuck", Duration::from_millis(200), move || std::fs::read(&fifo))
            .await
            .unwrap_err();
        assert!(matches!(e, OffThreadError::TimedOut(_)), "{e}");
        assert_eq!(e.to_string(), "no answer within 200ms");
        assert!(started.elapsed() < Duration::from_secs(2));
        // Unblock the stuck thread so it ends with the test.
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("fifo"))
            .unwrap();
        drop(writer);
        let e = off_thread("t-panic", Duration::from_secs(5), || -> u8 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(matches!(e, OffThreadError::Panicked), "{e}");
    }

    #[test]
    fn wildcards_are_reached_on_loopback() {
        assert_eq!(
            local_address("0.0.0.0:9901".parse().unwrap()),
            "127.0.0.1:9901".parse().unwrap()
        );
        assert_eq!(
            local_address("[::]:9901".parse().unwrap()),
            "[::1]:9901".parse().unwrap()
        );
        assert_eq!(
            local_address("10.0.0.1:9901".parse().unwrap()),
            "10.0.0.1:9901".parse().unwrap()
        );
    }

    #[test]
    fn http_reads_the_status_and_fails_on_a_closed_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).unwrap();
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\ndraining\n")
                .unwrap();
        });
        let (code, body) = http(addr, "GET", "/health", Duration::from_secs(2)).unwrap();
        server.join().unwrap();
        assert_eq!((code, body.as_str()), (503, "draining\n"));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(http(closed, "GET", "/health", Duration::from_secs(2)).is_err());
    }

    /// Issue 17: a server that accepts and never answers made `healthcheck`
    /// and `drain` say "Resource temporarily unavailable (os error 11)".
    #[test]
    fn a_silent_server_is_no_answer_within_the_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let e = http(addr, "GET", "/health", Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(e.to_string(), format!("no answer from {addr} within 300ms"));
        drop(listener);
    }
}
