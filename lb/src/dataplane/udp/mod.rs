//! UDP VIPs: flows of datagrams, each flow sent to one backend.
//!
//! # Flows
//! A flow is a client's address and port on one VIP. Its first datagram
//! picks a backend (Maglev hashes the address *and* the port, see
//! [`crate::balance::selection::PickContext::by_port`], so every balancer
//! of a pair, and the new active after a failover, sends the same flow to
//! the same backend while the backend set is the same) and opens one
//! socket connected to it ([`upstream`]); the flow's later datagrams go
//! through that socket, and what the backend sends back on it goes to the
//! client from the VIP's address (for a wildcard listener, from the address
//! the client sent to: `IP_PKTINFO`/`IPV6_PKTINFO`). A flow ends when it
//! has been idle for `udp_idle_timeout`, once each of its datagrams had
//! `udp_responses` replies (when set), when its backend answers with an
//! ICMP error, or when it is evicted.
//!
//! # Workers and sockets
//! Each worker thread ([`worker`]) has its own socket on every UDP VIP,
//! all in one `SO_REUSEPORT` group: the kernel hashes a datagram's
//! addresses and ports to one socket of the group, so a flow's datagrams
//! always reach the same worker (while the group is unchanged), whose
//! flow table needs no lock. Datagrams are read and replies sent in
//! batches (`recvmmsg`/`sendmmsg`, [`batch`]) through buffers made once per
//! worker; nothing is allocated per datagram (a new flow allocates its
//! entry, and keeps a copy of its first datagram for a retry, within a
//! per-worker byte budget).
//!
//! The port stays exclusive to this process, as a TCP VIP's does: [`bind`]
//! first binds a socket *without* `SO_REUSEPORT`, which fails while any
//! other socket has the port, and only then makes the group.
//!
//! # Bounds
//! - Flows: at most `max_connections` per VIP (the VIP's connection
//!   slots, shared by all workers). A new flow at the limit takes the place
//!   of the flow idle longest on its worker (counted as evicted); if that
//!   worker has none, the datagram is dropped (counted, logged at most once
//!   a second).
//! - Each flow holds one descriptor; out of descriptors, new flows are
//!   dropped and counted (`local_resources`), and no backend is blamed.
//! - A worker reads at most [`READS_PER_WAKE`] batches from one socket
//!   before it serves the others, so a flood on one VIP cannot starve the
//!   replies of another.
//!
//! # Failover: nothing forwarded after a step-down
//! Every batch, in either direction, is forwarded only under the VIP's
//! [`Gate`], and only while the HA lease is valid ([`lease::valid`]):
//! - A step-down closes the gate ([`Serving::close`]). Closing takes the
//!   gate's write lock, so it waits for a batch being forwarded under the
//!   read lock and then no worker forwards another datagram of that VIP:
//!   when [`Serving::close`] returns, this process sends nothing more to a
//!   backend or a client on it, whatever the worker threads do next. The
//!   workers then drop the VIP's flows and sockets.
//! - A process frozen past its lease (SIGSTOP, a paused VM) checks the
//!   lease before it forwards anything when it wakes, even before its
//!   election has run, and drops what the kernel queued meanwhile.
//! - The lease is also checked for each new flow, as for each accepted TCP
//!   connection.
//!
//! # What the network can do to it
//! - A datagram from anyone opens a flow: bounded (above), and a flow
//!   costs a descriptor until it is idle or evicted. Spoofed sources can
//!   churn flows out (eviction keeps the most recently active ones) but
//!   not grow memory.
//! - An ICMP port unreachable on a flow's socket counts as a failed
//!   connect against its backend, as a refused TCP connect does (ejection
//!   after `passive.eject_after` in a row). The kernel delivers it to the
//!   socket only if the quoted datagram matches the socket's addresses and
//!   its random source port, so an off-path attacker must guess a port per
//!   flow; and a reply from the backend resets the count. It can end a
//!   flow early; the next datagram opens a new one. Corroborated, then:
//!   one forged error does not eject a backend. Host and network
//!   unreachable (which a route gone from this host also produces) move or
//!   end the flow without blaming the backend; errors of `connect(2)` on a
//!   UDP socket are this host's (it sends nothing) and blame no one.
//! - Replies are accepted only on the flow's connected socket, which the
//!   kernel filters to the backend's address and port.

#![allow(unsafe_code)]

mod batch;
mod upstream;
mod worker;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock, RwLock};

use socket2::{Domain, Protocol, Socket, Type};

use crate::balance::table::Vip;
use crate::dataplane::lease;
use crate::dataplane::mailbox::{self, Mailbox};

/// How long [`Serving::close`] waits for the workers to close a stopped
/// VIP's sockets (they do within one turn of their loop).
const FORGET_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Batches read from one socket per wake-up before the worker moves on.
pub(crate) const READS_PER_WAKE: usize = 4;

/// Whether a UDP VIP may forward: open while serving; closed, for good,
/// by a step-down or a removal. See the module docs.
#[derive(Debug)]
pub(crate) struct Gate {
    open: RwLock<bool>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            open: RwLock::new(true),
        }
    }

    /// Closes the gate; returns once no batch is being forwarded under it.
    fn close(&self) {
        *self.open.write().unwrap_or_else(std::sync::PoisonError::into_inner) = false;
    }
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// The VIP is not served (step-down, removal, or past the lease).
    NotServing,
    /// The VIP is at its flow limit and this worker had no flow to evict.
    FlowLimit,
    /// No backend could be picked.
    NoBackend,
    /// Out of descriptors, memory or ports: our fault, no backend blamed.
    LocalResources,
    /// The backend's socket could not take it (its send buffer full).
    BackendBusy,
    /// Sending to the backend failed (an ICMP error from it, or no route).
    BackendError,
    /// Too large to send (with the PROXY header, past UDP's limit; or past
    /// the path's MTU).
    TooLarge,
    /// A reply could not be sent to the client.
    ReplyError,
}

impl DropReason {
    const ALL: [DropReason; 8] = [
        DropReason::NotServing,
        DropReason::FlowLimit,
        DropReason::NoBackend,
        DropReason::LocalResources,
        DropReason::BackendBusy,
        DropReason::BackendError,
        DropReason::TooLarge,
        DropReason::ReplyError,
    ];

    /// Its `reason` label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DropReason::NotServing => "not_serving",
            DropReason::FlowLimit => "flow_limit",
            DropReason::NoBackend => "no_backend",
            DropReason::LocalResources => "local_resources",
            DropReason::BackendBusy => "backend_busy",
            DropReason::BackendError => "backend_error",
            DropReason::TooLarge => "too_large",
            DropReason::ReplyError => "reply_error",
        }
    }
}

/// How flows ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Idle for `udp_idle_timeout`.
    Expired,
    /// Every datagram had its `udp_responses` replies.
    Answered,
    /// Its place was taken by a new flow at the limit.
    Evicted,
    /// Its backend answered with an ICMP error (no retry left).
    Failed,
    /// The VIP stopped being served.
    Closed,
}

impl End {
    const ALL: [End; 5] = [End::Expired, End::Answered, End::Evicted, End::Failed, End::Closed];

    /// Its `event` label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            End::Expired => "expired",
            End::Answered => "answered",
            End::Evicted => "evicted",
            End::Failed => "failed",
            End::Closed => "closed",
        }
    }
}

/// A UDP VIP's counters, kept by its workers (added once per batch) and
/// read for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    created: AtomicU64,
    ended: [AtomicU64; 5],
    active: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_out: AtomicU64,
    drops: [AtomicU64; 8],
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct StatsSnapshot {
    /// Live flows.
    pub(crate) flows_active: u64,
    /// Flows opened.
    pub(crate) flows_created: u64,
    /// Flows ended, by how (`expired`, `answered`, `evicted`, `failed`,
    /// `closed`).
    pub(crate) flows_ended: std::collections::BTreeMap<&'static str, u64>,
    /// Datagrams from clients forwarded to backends.
    pub(crate) datagrams_in: u64,
    /// Datagrams from backends forwarded to clients.
    pub(crate) datagrams_out: u64,
    /// Datagrams dropped, by reason.
    pub(crate) drops: std::collections::BTreeMap<&'static str, u64>,
}

impl Stats {
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            flows_active: load(&self.active),
            flows_created: load(&self.created),
            flows_ended: End::ALL
                .iter()
                .map(|e| (e.as_str(), load(&self.ended[*e as usize])))
                .collect(),
            datagrams_in: load(&self.datagrams_in),
            datagrams_out: load(&self.datagrams_out),
            drops: DropReason::ALL
                .iter()
                .map(|d| (d.as_str(), load(&self.drops[*d as usize])))
                .collect(),
        }
    }

    fn dropped(&self, why: DropReason, n: u64) {
        if n > 0 {
            self.drops[why as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    fn created(&self) {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    fn ended(&self, how: End) {
        self.ended[how as usize].fetch_add(1, Ordering::Relaxed);
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds `n` sockets of one `SO_REUSEPORT` group on `addr`, after checking
/// that no other socket has the port (see the module docs). Each has
/// IP_FREEBIND (the floating VIP may not be on the host yet) and, on a
/// wildcard address, `IP_PKTINFO`/`IPV6_RECVPKTINFO`.
pub(crate) fn bind(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    {
        let probe = socket(addr, false)?;
        probe.bind(&addr.into())?;
        // Dropped here: the port is free for the group below.
    }
    (0..n.max(1))
        .map(|_| {
            let s = socket(addr, true)?;
            s.bind(&addr.into())?;
            Ok(s.into())
        })
        .collect()
}

fn socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv4() {
        s.set_freebind(true)?;
    } else {
        s.set_freebind_ipv6(true)?;
    }
    s.set_reuse_port(reuse_port)?;
    s.set_nonblocking(true)?;
    if reuse_port && addr.ip().is_unspecified() {
        let one: libc::c_int = 1;
        let (level, name) = if addr.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_PKTINFO)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
        };
        // SAFETY: setsockopt with a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        if addr.is_ipv6() {
            // Dual-stack: IPv4 clients arrive as mapped addresses and get
            // their destination in IP_PKTINFO.
            // SAFETY: as above.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_PKTINFO,
                    std::ptr::addr_of!(one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                tracing::debug!(error = %io::Error::last_os_error(), "no IP_PKTINFO on a dual-stack UDP socket");
            }
        }
    }
    Ok(s)
}

/// What a worker is told.
pub(crate) enum Command {
    /// Serve `vip` on `socket` while `gate` is open.
    Listen {
        vip: Arc<Vip>,
        socket: std::net::UdpSocket,
        gate: Arc<Gate>,
        stats: Arc<Stats>,
    },
    /// Drop the listener (and its flows) of this gate, then say so.
    Forget(Arc<Gate>, mpsc::Sender<()>),
}

/// The control plane's handle on one UDP worker.
type Handle = Mailbox<Command>;

/// The UDP worker threads, started with the first UDP VIP.
#[derive(Debug, Default)]
pub(crate) struct Workers {
    workers: OnceLock<Vec<Handle>>,
}

impl Workers {
    /// Serves `vip` on `sockets` (one per worker, from [`bind`]), starting
    /// the workers on first use. The returned [`Serving`] stops it.
    pub(crate) fn serve(
        &self,
        vip: &Arc<Vip>,
        sockets: Vec<std::net::UdpSocket>,
        stats: &Arc<Stats>,
    ) -> io::Result<Serving> {
        let workers = match self.workers.get() {
            Some(w) => w,
            None => {
                let started = start(sockets.len())?;
                self.workers.get_or_init(|| started)
            }
        };
        let gate = Arc::new(Gate::new());
        let mut on = 0;
        for (socket, worker) in sockets.into_iter().zip(workers.iter()) {
            worker.send(Command::Listen {
                vip: Arc::clone(vip),
                socket,
                gate: Arc::clone(&gate),
                stats: Arc::clone(stats),
            });
            on += 1;
        }
        Ok(Serving {
            gate,
            workers: workers.iter().take(on).cloned().collect(),
        })
    }

    /// How many worker threads a VIP's group needs: one socket each.
    pub(crate) fn count(&self, default: usize) -> usize {
        self.workers.get().map_or(default, Vec::len)
    }
}

/// A UDP VIP being served; [`Serving::close`] stops it.
#[derive(Debug)]
pub(crate) struct Serving {
    gate: Arc<Gate>,
    workers: Vec<Handle>,
}

impl Serving {
    /// Stops forwarding on this VIP, synchronously: when this returns no
    /// worker forwards another datagram of it (see the module docs). Then
    /// the workers close its sockets and flows; this waits (at most
    /// [`FORGET_WAIT`]) until they have, so that the port is free for a
    /// new bind at once, as a TCP listener's is after `shutdown(2)`.
    pub(crate) fn close(self) {
        self.gate.close();
        let (done, acks) = mpsc::channel();
        let n = self.workers.len();
        for worker in &self.workers {
            worker.send(Command::Forget(Arc::clone(&self.gate), done.clone()));
        }
        let deadline = std::time::Instant::now() + FORGET_WAIT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if acks.recv_timeout(left).is_err() {
                tracing::warn!(wait = ?FORGET_WAIT, "a UDP worker has not closed a stopped VIP's socket yet; it will (nothing is forwarded meanwhile)");
                return;
            }
        }
    }
}

/// Starts `n` UDP worker threads.
fn start(n: usize) -> io::Result<Vec<Handle>> {
    (0..n.max(1))
        .map(|i| {
            let (handle, inbox) = mailbox::new("UDP", libc::EFD_NONBLOCK)?;
            std::thread::Builder::new()
                .name(format!("halo-udp-{i}"))
                .spawn(move || match worker::Worker::new(inbox.commands, inbox.wake) {
                    Ok(worker) => worker.run(),
                    Err(e) => tracing::error!(error = %e, "cannot start a UDP worker"),
                })?;
            Ok(handle)
        })
        .collect()
}

/// Whether a datagram may be forwarded now: the gate open and the lease
/// valid. Hold the guard while forwarding the batch.
fn serving(gate: &Gate) -> Option<std::sync::RwLockReadGuard<'_, bool>> {
    let guard = gate.open.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    (*guard && lease::valid()).then_some(guard)
}
