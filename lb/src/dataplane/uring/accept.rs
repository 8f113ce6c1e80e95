//! Accepting: a listener's single accept in flight, armed only when the
//! VIP has a slot, the process has descriptors and a backend socket is
//! ready; the lease check of every accepted client.

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types};
use socket2::SockAddr;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::table::{ClientSlot, Vip};
use crate::dataplane::pressure::{self, Op, RateLimit};
use crate::dataplane::{lease, workers};

use super::conn::{tcp_socket, Conn, Direction, Phase};
use super::{token, Kind, Worker, RECHECK};

/// A backend socket made before its client is accepted (see the module
/// docs and `proxy::Spare`).
pub(super) struct Spare {
    pub(super) fd: OwnedFd,
    pub(super) v4: bool,
}

impl Spare {
    pub(super) fn new(v4: bool) -> io::Result<Spare> {
        Ok(Spare {
            fd: tcp_socket(v4)?,
            v4,
        })
    }
}

pub(super) struct Listener {
    pub(super) vip: Arc<Vip>,
    pub(super) socket: std::net::TcpListener,
    pub(super) stop: CancellationToken,
    pub(super) tracker: TaskTracker,
    pub(super) serial: u64,
    /// Where the pending accept writes the client's address.
    pub(super) addr: Box<(libc::sockaddr_storage, libc::socklen_t)>,
    /// An accept is in flight.
    pub(super) pending: bool,
    /// A cancel of that accept has been sent.
    pub(super) cancelling: bool,
    /// A timer will look at this listener again.
    pub(super) paused: bool,
    pub(super) slot: Option<ClientSlot>,
    pub(super) spare: Option<Spare>,
    /// Already left one connection to the other workers.
    pub(super) deferred: bool,
    /// This worker's turn at leaving connections to the others, held for
    /// the wait.
    pub(super) yielding: Option<workers::Yield>,
    /// The connection-limit pause was counted.
    pub(super) at_limit: bool,
    pub(super) errors: RateLimit,
}

impl Worker {
    // ---- accept ----

    /// Arms the listener's accept if it may take a connection now;
    /// otherwise pauses it for a moment.
    pub(super) fn arm_accept(&mut self, index: usize) {
        let Some(l) = self.listeners.get(index) else { return };
        if l.pending || l.paused {
            return;
        }
        // A wait for the other workers (if this was one) is over.
        l.yielding = None;
        if l.stop.is_cancelled() {
            self.remove_listener(index);
            return;
        }
        // Out of descriptors (or ports, or socket memory): leave new
        // clients in the backlog until a connection ends.
        if pressure::under_pressure() {
            return self.pause_listener(index, RECHECK);
        }
        if l.slot.is_none() {
            match l.vip.try_reserve_slot() {
                Some(slot) => {
                    l.slot = Some(slot);
                    l.at_limit = false;
                }
                None => {
                    if !l.at_limit {
                        l.at_limit = true;
                        l.vip.limit_reached();
                    }
                    return self.pause_listener(index, RECHECK);
                }
            }
        }
        if l.spare.is_none() {
            // The family most backends of the table have; a connection to
            // one of the other family swaps it.
            match Spare::new(l.vip.mostly_v4()) {
                Ok(spare) => l.spare = Some(spare),
                Err(e) if pressure::is_local(&e) => {
                    pressure::report(Op::Accept, l.vip.name(), &e);
                    return self.pause_listener(index, RECHECK);
                }
                Err(e) => {
                    if let Some(suppressed) = l.errors.allow() {
                        tracing::warn!(vip = l.vip.name(), error = %e, suppressed, "cannot make a backend socket");
                    }
                    return self.pause_listener(index, Duration::from_millis(20));
                }
            }
        }
        // Carrying clearly more than another worker: leave this connection
        // to it for a moment (see `workers`), then take it regardless.
        if !l.deferred {
            if let Some(turn) = workers::should_defer_accept() {
                l.deferred = true;
                l.yielding = Some(turn);
                return self.pause_listener(index, workers::ACCEPT_DEFER);
            }
        }
        l.pending = true;
        l.addr.1 = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let addr: *mut libc::sockaddr_storage = &mut l.addr.0;
        let len: *mut libc::socklen_t = &mut l.addr.1;
        let entry = opcode::Accept::new(types::Fd(l.socket.as_raw_fd()), addr.cast(), len)
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(token(index, Kind::Accept));
        self.push(&entry);
    }

    pub(super) fn accepted(&mut self, index: usize, result: i32) {
        let Some(l) = self.listeners.get(index) else {
            if result >= 0 {
                // SAFETY: a descriptor the kernel just gave us.
                drop(unsafe { OwnedFd::from_raw_fd(result) });
            }
            return;
        };
        l.pending = false;
        l.cancelling = false;
        if result < 0 {
            let e = io::Error::from_raw_os_error(-result);
            if l.stop.is_cancelled() {
                self.remove_listener(index);
                return;
            }
            if pressure::is_local(&e) {
                pressure::report(Op::Accept, l.vip.name(), &e);
                return self.pause_listener(index, RECHECK);
            }
            if result != -libc::ECANCELED {
                // Anything else (ECONNABORTED, EPERM from a firewall hook):
                // back off briefly instead of spinning; log once a second.
                if let Some(suppressed) = l.errors.allow() {
                    tracing::warn!(vip = l.vip.name(), error = %e, suppressed, "accept failed");
                }
            }
            return self.pause_listener(index, Duration::from_millis(20));
        }
        // SAFETY: a descriptor the kernel just gave us.
        let client = unsafe { OwnedFd::from_raw_fd(result) };
        let peer = sockaddr_to_std(&l.addr.0, l.addr.1);
        l.deferred = false;
        if !lease::valid() {
            // Past the lease (a frozen process waking up, or the instant
            // before the election shuts the listener): serve nothing.
            // Closing at once lets the client try the new active.
            l.vip.metrics().lease_refusals.increment(1);
            tracing::debug!(vip = l.vip.name(), client = ?peer, "accepted past the lease; closed");
            drop(client);
            self.arm_accept(index);
            return;
        }
        let (Some(mut slot), Some(spare)) = (l.slot.take(), l.spare.take()) else {
            // Armed only with both; never here.
            drop(client);
            self.arm_accept(index);
            return;
        };
        slot.accepted();
        let vip = Arc::clone(&l.vip);
        let tracked = l.tracker.token();
        let table = vip.table();
        let settings = Arc::clone(&table.settings);
        let serial = self.next_serial();
        let conn = Box::new(Conn {
            serial,
            client,
            backend: Some(spare.fd),
            v4: spare.v4,
            peer: peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            phase: Phase::Connecting,
            inflight: 0,
            aborting: false,
            settings,
            table: Some(table),
            tried: Vec::new(),
            attempt: 0,
            picked: 0,
            local_wait_ends: None,
            addr: SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0))),
            timeout: types::Timespec::new(),
            header: Vec::new(),
            header_sent: 0,
            dirs: [Direction::default(), Direction::default()],
            last_activity: self.now,
            _active: None,
            _slot: slot,
            _load: workers::Load::start(),
            _tracked: tracked,
            vip,
        });
        let conn = self.conns.insert(conn);
        self.arm_accept(index);
        self.connect(conn);
    }
}

pub(super) fn sockaddr_to_std(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: the kernel filled `storage` with `len` bytes of an address.
    let addr = unsafe { SockAddr::new(*storage, len) };
    addr.as_socket()
}
