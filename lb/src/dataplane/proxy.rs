//! The accept loop of one VIP and the life of one proxied connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::selection::PickContext;
use crate::balance::table::Vip;
use crate::dataplane::copy::{self, Ended, Meters};
use crate::dataplane::pressure::{self, Op, RateLimit};
use crate::dataplane::proxy_protocol;
use crate::dataplane::workers;
use crate::settings::ProxyProtocol;

/// Binds a VIP listener: SO_REUSEADDR (restart without waiting out
/// TIME_WAIT), IP_FREEBIND (bind an address not yet on the host, for the
/// floating VIP), TCP_NODELAY (Linux copies it to every accepted socket, so
/// clients need no `setsockopt` of their own), and the given backlog.
/// Deliberately not SO_REUSEPORT: a second process binding the same VIP
/// must fail, not silently share it. Workers share this one socket (see
/// `crate::dataplane::workers`).
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_freebind(true)?;
    } else {
        socket.set_freebind_ipv6(true)?;
    }
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// A backend socket made before its client is accepted, so that every
/// accepted client can connect out: under a descriptor shortage the accept
/// loop stops at the socket, and clients wait in the backlog instead of
/// being accepted into a process with no descriptor left to reach a backend.
#[derive(Debug)]
struct Spare {
    v4: bool,
    socket: TcpSocket,
}

impl Spare {
    fn new(v4: bool) -> io::Result<Spare> {
        let socket = if v4 { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        Ok(Spare { v4, socket })
    }
}

/// Accepts on `listener` until `stop` is cancelled, handing each connection
/// to a task on `tracker`. Pauses at the VIP's connection limit, and while
/// the process is out of descriptors ([`pressure`]).
pub(crate) async fn accept_loop(vip: Arc<Vip>, listener: TcpListener, stop: CancellationToken, tracker: TaskTracker) {
    let local = listener.local_addr().ok();
    tracing::info!(vip = vip.name(), listen = ?local, "accepting");
    let accept_errors = RateLimit::new(Duration::from_secs(1));
    let mut spare: Option<Spare> = None;
    loop {
        // Out of descriptors (or ports, or socket memory): leave new
        // clients in the backlog until a connection ends.
        if pressure::under_pressure() {
            tokio::select! {
                () = stop.cancelled() => break,
                () = pressure::wait_clear() => {}
            }
        }
        let mut slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = vip.reserve_slot() => slot,
        };
        let socket = match spare.take() {
            Some(s) => s,
            // The family most backends of the table have; a connection to
            // one of the other family swaps it (one descriptor for another).
            None => match Spare::new(vip.mostly_v4()) {
                Ok(s) => s,
                Err(e) if pressure::is_local(&e) => {
                    pressure::report(Op::Accept, vip.name(), &e);
                    continue;
                }
                Err(e) => {
                    if let Some(suppressed) = accept_errors.allow() {
                        tracing::warn!(vip = vip.name(), error = %e, suppressed, "cannot make a backend socket");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        // Carrying clearly more than another worker: leave this connection
        // to it for a moment (see `workers`), then take it regardless.
        if let Some(_turn) = workers::should_defer_accept() {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(workers::ACCEPT_DEFER) => {}
            }
        }
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) if !crate::dataplane::lease::valid() => {
                // Past the lease (a frozen process waking up, or the instant
                // before the election shuts the listener): serve nothing.
                // Closing at once lets the client try the new active.
                vip.metrics().lease_refusals.increment(1);
                tracing::debug!(vip = vip.name(), client = %peer, "accepted past the lease; closed");
                drop(stream);
                spare = Some(socket);
            }
            Ok((stream, peer)) => {
                slot.accepted();
                let vip = Arc::clone(&vip);
                let load = workers::Load::start();
                tracker.spawn(async move {
                    handle(&vip, stream, peer, socket).await;
                    drop(load);
                    drop(slot);
                    // Its descriptors are free again.
                    pressure::relieve();
                });
            }
            Err(_) if stop.is_cancelled() => break,
            Err(e) if pressure::is_local(&e) => {
                spare = Some(socket);
                pressure::report(Op::Accept, vip.name(), &e);
            }
            Err(e) => {
                spare = Some(socket);
                // Anything else (ECONNABORTED, EPERM from a firewall hook):
                // back off briefly instead of spinning; log once a second.
                if let Some(suppressed) = accept_errors.allow() {
                    tracing::warn!(vip = vip.name(), error = %e, suppressed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tracing::info!(vip = vip.name(), listen = ?local, "stopped accepting");
}

/// Connects `client` to a backend (retrying others on failure) and proxies
/// until the connection ends.
///
/// Both sockets send small writes at once (TCP_NODELAY: the client's from
/// the listener, see [`bind`]; the backend's set before connecting). No TCP
/// keepalive (as HAProxy and Envoy by default): the idle timeout ends
/// connections to vanished peers, without three syscalls per socket.
async fn handle(vip: &Vip, client: TcpStream, peer: SocketAddr, spare: Spare) {
    // One snapshot for the whole set-up: swaps meanwhile don't affect it.
    let table = vip.table();
    let settings = Arc::clone(&table.settings);
    let metrics = vip.metrics();
    let mut tried: Vec<usize> = Vec::new();
    let mut connected = None;
    let mut attempt = 0;
    let mut local_wait_ends = None;
    let mut spare = Some(spare);
    while attempt <= settings.retries {
        let ctx = PickContext {
            client: peer,
            cursor: vip.cursor(),
            now: Vip::now(),
            tried: &tried,
            by_port: false,
        };
        let Some(i) = table.pick(&ctx) else { break };
        let entry = &table.entries[i];
        if attempt > 0 {
            metrics.retries.increment(1);
        }
        match connect(entry.backend.addr, settings.connect_timeout, &mut spare).await {
            Ok(stream) => {
                entry.state.connect_succeeded();
                connected = Some((stream, Arc::clone(&entry.state)));
                break;
            }
            Err(e) if pressure::is_local(&e) => {
                // Our own shortage, not the backend's fault: no failure, no
                // ejection, no attempt used. Wait for a connection to end
                // and try again, within a bound.
                pressure::report(Op::Connect, vip.name(), &e);
                let ends = *local_wait_ends.get_or_insert_with(|| tokio::time::Instant::now() + pressure::CLIENT_WAIT);
                if !pressure::wait_relief(ends).await {
                    metrics.local_resource_closes.increment(1);
                    tracing::warn!(vip = vip.name(), client = %peer, waited = ?pressure::CLIENT_WAIT, "out of local resources for too long; closing client");
                    return;
                }
            }
            Err(e) => {
                metrics.connect_failures.increment(1);
                entry.state.connect_failed(Vip::now(), &settings.passive);
                tracing::debug!(vip = vip.name(), backend = %entry.backend.addr, error = %e, attempt, "backend connect failed");
                tried.push(i);
                attempt += 1;
            }
        }
    }
    let Some((mut backend, state)) = connected else {
        metrics.no_backend.increment(1);
        tracing::warn!(vip = vip.name(), client = %peer, tried = tried.len(), "no backend reachable; closing client");
        return;
    };
    let _active = state.start_connection();
    drop(table);

    let result = async {
        if settings.proxy_protocol != ProxyProtocol::Off {
            let header = proxy_protocol::header(settings.proxy_protocol, peer, client.local_addr()?);
            backend.write_all(&header).await?;
        }
        copy::proxy(
            &client,
            &backend,
            settings.copy,
            settings.idle_timeout,
            Meters {
                bytes_in: &metrics.bytes_in,
                bytes_out: &metrics.bytes_out,
            },
        )
        .await
    }
    .await;
    match result {
        Ok(Ended::Closed) => {}
        Ok(Ended::IdleTimeout) => {
            metrics.idle_timeouts.increment(1);
            tracing::debug!(vip = vip.name(), client = %peer, "idle timeout");
        }
        Err(e) => tracing::debug!(vip = vip.name(), client = %peer, error = %e, "connection ended with an error"),
    }
}

/// Connects to `addr`, on the spare socket if it has the right family.
async fn connect(addr: SocketAddr, timeout: Duration, spare: &mut Option<Spare>) -> io::Result<TcpStream> {
    let socket = match spare.take() {
        Some(s) if s.v4 == addr.is_ipv4() => s.socket,
        other => {
            // Close the wrong-family spare first: its descriptor is the one
            // the new socket may need.
            drop(other);
            Spare::new(addr.is_ipv4())?.socket
        }
    };
    socket.set_nodelay(true)?;
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out after {timeout:?}"),
            )
        })??;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_clients_inherit_nodelay_from_the_listener() {
        // The data plane sets no TCP_NODELAY per client: it relies on this.
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
