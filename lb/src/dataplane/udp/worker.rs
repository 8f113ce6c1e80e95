//! One UDP worker: an epoll loop over its socket of every UDP VIP and the
//! connected socket of each of its flows. See the [module docs](super).

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::batch::{Batch, BATCH};
use super::upstream::{backend_refused, connected_socket, path_error, send};
use super::{serving, Command, DropReason, End, Gate, Stats, READS_PER_WAKE};
use crate::balance::backend::{ActiveConnection, BackendState};
use crate::balance::selection::PickContext;
use crate::balance::table::{ClientSlot, Table, Vip};
use crate::dataplane::pressure::{self, Op, RateLimit};
use crate::dataplane::proxy_protocol;
use crate::dataplane::slab::Slab;
use crate::settings::ProxyProtocol;

/// No flow: the end of a list.
const NIL: usize = usize::MAX;

/// Bytes of first datagrams a worker keeps for retries (a flow whose first
/// datagram meets an ICMP error resends it to another backend). Past it,
/// new flows keep none and are not retried.
const FIRST_BUDGET: usize = 4 << 20;

/// The longest epoll wait: flows expire at most this late.
const MAX_WAIT: Duration = Duration::from_secs(1);

const KIND_WAKE: u64 = 0;
const KIND_LISTENER: u64 = 1;
const KIND_FLOW: u64 = 2;

fn token(kind: u64, index: usize, serial: u64) -> u64 {
    (kind << 62) | ((serial & 0x3fff_ffff) << 32) | (index as u64 & 0xffff_ffff)
}

struct Listener {
    vip: Arc<Vip>,
    socket: std::net::UdpSocket,
    gate: Arc<Gate>,
    stats: Arc<Stats>,
    /// Wildcard address: replies name their source (`IP_PKTINFO`).
    pktinfo: bool,
    v6: bool,
    /// The bound address (the VIP's, or a wildcard).
    local: SocketAddr,
    flows: HashMap<SocketAddr, usize>,
    /// Flows by last activity: `head` idle longest, `tail` most recent.
    head: usize,
    tail: usize,
    limit_log: RateLimit,
}

/// A flow whose backend has not answered yet: what a retry needs.
struct Pending {
    table: Arc<Table>,
    picked: usize,
    tried: Vec<usize>,
    /// The first datagram, if the budget allowed a copy.
    first: Option<Box<[u8]>>,
}

struct Flow {
    serial: u64,
    listener: usize,
    client: SocketAddr,
    /// The address the client sent to (wildcard listeners).
    local: Option<IpAddr>,
    upstream: OwnedFd,
    backend: Arc<BackendState>,
    _active: ActiveConnection,
    _slot: ClientSlot,
    /// PROXY v2 DGRAM header sent in front of every datagram; empty: none.
    header: Vec<u8>,
    pending: Option<Box<Pending>>,
    requests: u64,
    responses: u64,
    last: Instant,
    prev: usize,
    next: usize,
}

pub(super) struct Worker {
    epoll: OwnedFd,
    wake: Arc<OwnedFd>,
    commands: mpsc::Receiver<Command>,
    listeners: Slab<Listener>,
    flows: Slab<Flow>,
    /// Datagrams from clients (taken out while they are forwarded).
    rx: Option<Box<Batch>>,
    /// Replies to clients, all from `tx_listener`'s socket.
    tx: Box<Batch>,
    tx_listener: usize,
    first_bytes: usize,
    serial: u64,
    now: Instant,
    errors: RateLimit,
}

/// What became of a flow whose backend failed.
enum Failover {
    /// It moved to another backend; `resent`: its first datagram went
    /// there too (a copy was kept).
    Moved { resent: bool },
    /// It ended: no backend left to try within `retries`.
    Ended,
}

impl Worker {
    pub(super) fn new(commands: mpsc::Receiver<Command>, wake: Arc<OwnedFd>) -> io::Result<Worker> {
        // SAFETY: plain epoll_create1(2), checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let worker = Worker {
            epoll,
            wake,
            commands,
            listeners: Slab::new(),
            flows: Slab::new(),
            rx: Some(Box::new(Batch::new())),
            tx: Box::new(Batch::new()),
            tx_listener: NIL,
            first_bytes: 0,
            serial: 0,
            now: Instant::now(),
            errors: RateLimit::new(Duration::from_secs(1)),
        };
        worker.register(worker.wake.as_raw_fd(), token(KIND_WAKE, 0, 0))?;
        Ok(worker)
    }

    fn register(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: epoll_ctl with a live event.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let wait = self.next_wait();
            // SAFETY: epoll_wait into a live buffer of its length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    i32::try_from(wait.as_millis()).unwrap_or(1000).max(1),
                )
            };
            self.now = Instant::now();
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "UDP worker: epoll_wait failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            for ev in &events[..n as usize] {
                let t = ev.u64;
                let (kind, serial, index) = (t >> 62, (t >> 32) & 0x3fff_ffff, (t & 0xffff_ffff) as usize);
                match kind {
                    KIND_WAKE => {
                        if !self.commands() {
                            return;
                        }
                    }
                    KIND_LISTENER => self.read_clients(index),
                    _ => self.read_backend(index, serial),
                }
            }
            self.flush();
            self.expire();
        }
    }

    // ---- commands ----

    /// Runs queued commands; false once the control plane is gone.
    fn commands(&mut self) -> bool {
        let mut buf = 0u64;
        // SAFETY: reads 8 bytes into a live u64 (EAGAIN when empty).
        unsafe { libc::read(self.wake.as_raw_fd(), std::ptr::addr_of_mut!(buf).cast(), 8) };
        loop {
            match self.commands.try_recv() {
                Ok(Command::Listen {
                    vip,
                    socket,
                    gate,
                    stats,
                }) => self.listen(vip, socket, gate, stats),
                Ok(Command::Forget(gate, done)) => {
                    self.forget(&gate);
                    let _ = done.send(());
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn listen(&mut self, vip: Arc<Vip>, socket: std::net::UdpSocket, gate: Arc<Gate>, stats: Arc<Stats>) {
        let local = match socket.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(vip = vip.name(), error = %e, "UDP socket has no address; not served by this worker");
                return;
            }
        };
        let fd = socket.as_raw_fd();
        let index = self.listeners.insert(Listener {
            vip,
            socket,
            gate,
            stats,
            pktinfo: local.ip().is_unspecified(),
            v6: local.is_ipv6(),
            local,
            flows: HashMap::new(),
            head: NIL,
            tail: NIL,
            limit_log: RateLimit::new(Duration::from_secs(1)),
        });
        if let Err(e) = self.register(fd, token(KIND_LISTENER, index, 0)) {
            let l = self.listeners.remove(index);
            tracing::error!(vip = l.as_ref().map(|l| l.vip.name()), error = %e, "cannot watch a UDP socket");
        }
    }

    fn forget(&mut self, gate: &Arc<Gate>) {
        let found: Vec<usize> = self
            .listeners
            .indices()
            .collect::<Vec<_>>()
            .into_iter()
            .filter(|&i| self.listeners.get(i).is_some_and(|l| Arc::ptr_eq(&l.gate, gate)))
            .collect();
        for li in found {
            if self.tx_listener == li {
                // Not sent: the gate is closed.
                if let Some(l) = self.listeners.get(li) {
                    l.stats.dropped(DropReason::NotServing, self.tx.len() as u64);
                }
                self.tx.clear();
                self.tx_listener = NIL;
            }
            while let Some(head) = self.listeners.get(li).map(|l| l.head).filter(|&h| h != NIL) {
                if self.flows.get(head).is_none() {
                    break;
                }
                self.end(head, End::Closed);
            }
            self.listeners.remove(li);
        }
    }

    // ---- clients to backends ----

    fn read_clients(&mut self, li: usize) {
        for _ in 0..READS_PER_WAKE {
            let Some(l) = self.listeners.get(li) else { return };
            let (fd, pktinfo) = (l.socket.as_raw_fd(), l.pktinfo);
            let (gate, stats, vip) = (Arc::clone(&l.gate), Arc::clone(&l.stats), Arc::clone(&l.vip));
            let mut rx = self.rx.take().expect("the receive batch is home between calls");
            let n = match rx.recv_from(fd, pktinfo) {
                Ok(n) => n,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        if let Some(suppressed) = self.errors.allow() {
                            tracing::warn!(vip = vip.name(), error = %e, suppressed, "UDP receive failed");
                        }
                    }
                    0
                }
            };
            if n > 0 {
                match serving(&gate) {
                    None => stats.dropped(DropReason::NotServing, n as u64),
                    Some(_forwarding) => {
                        let table = vip.table();
                        let (mut sent, mut bytes) = (0u64, 0u64);
                        for i in 0..n {
                            let Some(client) = rx.addr(i) else { continue };
                            let to = if pktinfo { rx.destination(i) } else { None };
                            let data = rx.data(i);
                            if self.client_datagram(li, client, to, data, &table) {
                                sent += 1;
                                bytes += data.len() as u64;
                            }
                        }
                        stats.datagrams_in.fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
                        vip.metrics().bytes_in.increment(bytes);
                    }
                }
            }
            self.rx = Some(rx);
            if n < BATCH {
                return;
            }
        }
    }

    /// Forwards one datagram to its flow's backend, opening the flow if
    /// it is new. Returns whether it was sent.
    fn client_datagram(
        &mut self,
        li: usize,
        client: SocketAddr,
        to: Option<IpAddr>,
        data: &[u8],
        table: &Arc<Table>,
    ) -> bool {
        let Some(l) = self.listeners.get(li) else { return false };
        let fi = match l.flows.get(&client) {
            Some(&fi) => fi,
            None => match self.open(li, client, to, data, table, Vec::new()) {
                Some(fi) => fi,
                None => return false,
            },
        };
        let sent = match self.send(fi, data) {
            Ok(()) => Ok(()),
            Err(e) if path_error(&e) => {
                // An ICMP error from an earlier datagram: the backend is
                // gone. A flow still waiting for its first answer moves to
                // another backend (within `retries`); one that was answered
                // ends, and this datagram opens a new flow that avoids the
                // failed backend (Maglev would pick it again otherwise).
                let Some(f) = self.flows.get(fi) else { return false };
                let (first, failed) = (f.requests == 0, f.backend.addr());
                match self.backend_failed(fi, &e) {
                    // The copy of this very datagram went.
                    Failover::Moved { resent: true } if first => Ok(()),
                    Failover::Moved { .. } => self.send(fi, data),
                    Failover::Ended if first => Err(e),
                    Failover::Ended => {
                        let table = li_table(&self.listeners, li).unwrap_or_else(|| Arc::clone(table));
                        let tried = table
                            .entries
                            .iter()
                            .position(|en| en.backend.addr == failed)
                            .into_iter()
                            .collect();
                        match self.open(li, client, to, data, &table, tried) {
                            Some(fi) => self.send(fi, data),
                            // Counted where it failed.
                            None => return false,
                        }
                    }
                }
            }
            Err(e) => Err(e),
        };
        let Err(e) = sent else { return true };
        let why = if path_error(&e) {
            DropReason::BackendError
        } else if e.raw_os_error() == Some(libc::EMSGSIZE) {
            // Too large for the path (or, with the PROXY header, for UDP).
            DropReason::TooLarge
        } else {
            // EAGAIN, ENOBUFS: this host's own send queue; no blame.
            DropReason::BackendBusy
        };
        if let Some(l) = self.listeners.get(li) {
            l.stats.dropped(why, 1);
        }
        false
    }

    /// Opens a flow for `client`: a connection slot (evicting this
    /// worker's flow idle longest at the limit), a backend, a connected
    /// socket. `None` (counted) when any is missing.
    fn open(
        &mut self,
        li: usize,
        client: SocketAddr,
        to: Option<IpAddr>,
        first: &[u8],
        table: &Arc<Table>,
        tried: Vec<usize>,
    ) -> Option<usize> {
        let l = self.listeners.get(li)?;
        let stats = Arc::clone(&l.stats);
        let mut slot = match l.vip.try_reserve_slot() {
            Some(slot) => slot,
            None => {
                let victim = l.head;
                if victim != NIL {
                    self.end(victim, End::Evicted);
                }
                let l = self.listeners.get(li)?;
                match l.vip.try_reserve_slot() {
                    Some(slot) => slot,
                    None => {
                        stats.dropped(DropReason::FlowLimit, 1);
                        if let Some(suppressed) = l.limit_log.allow() {
                            let limit = table.settings.max_connections;
                            tracing::warn!(
                                vip = l.vip.name(),
                                limit,
                                suppressed,
                                "UDP flow limit reached; datagram dropped"
                            );
                        }
                        return None;
                    }
                }
            }
        };
        let settings = &table.settings;
        let l = self.listeners.get(li)?;
        let ctx = PickContext {
            client,
            cursor: l.vip.cursor(),
            now: Vip::now(),
            tried: &tried,
            by_port: true,
        };
        let Some(picked) = table.pick(&ctx).filter(|_| tried.len() <= settings.retries as usize) else {
            stats.dropped(DropReason::NoBackend, 1);
            l.vip.metrics().no_backend.increment(1);
            return None;
        };
        let backend = table.entries[picked].backend.addr;
        let upstream = match connected_socket(backend) {
            Ok(fd) => fd,
            Err(e) => {
                // connect(2) on a UDP socket sends nothing: it looks up a
                // route and a local port. Whatever fails there is this
                // host's (descriptors, ports, routes, a firewall), never
                // the backend's.
                if pressure::is_local(&e) {
                    pressure::report(Op::Connect, l.vip.name(), &e);
                } else if let Some(suppressed) = self.errors.allow() {
                    tracing::warn!(vip = l.vip.name(), %backend, error = %e, suppressed, "cannot open a UDP flow's socket");
                }
                stats.dropped(DropReason::LocalResources, 1);
                return None;
            }
        };
        let l = self.listeners.get(li)?;
        let entry = &table.entries[picked];
        let header = if settings.proxy_protocol == ProxyProtocol::V2 {
            let local = SocketAddr::new(to.unwrap_or(l.local.ip()), l.local.port());
            proxy_protocol::header_dgram(client, local)
        } else {
            Vec::new()
        };
        let first = (self.first_bytes + first.len() <= FIRST_BUDGET).then(|| Box::<[u8]>::from(first));
        self.first_bytes += first.as_ref().map_or(0, |f| f.len());
        slot.accepted();
        self.serial += 1;
        let serial = self.serial;
        let fd = upstream.as_raw_fd();
        let flow = Flow {
            serial,
            listener: li,
            client,
            local: to,
            upstream,
            backend: Arc::clone(&entry.state),
            _active: entry.state.start_connection(),
            _slot: slot,
            header,
            pending: Some(Box::new(Pending {
                table: Arc::clone(table),
                picked,
                tried,
                first,
            })),
            requests: 0,
            responses: 0,
            last: self.now,
            prev: NIL,
            next: NIL,
        };
        let fi = self.flows.insert(flow);
        if let Err(e) = self.register(fd, token(KIND_FLOW, fi, serial)) {
            tracing::warn!(error = %e, "cannot watch a UDP flow's socket");
            stats.dropped(DropReason::LocalResources, 1);
            self.forget_flow(fi);
            return None;
        }
        let l = self.listeners.get(li)?;
        l.flows.insert(client, fi);
        stats.created();
        self.push_tail(li, fi);
        Some(fi)
    }

    /// Sends `data` on flow `fi` (behind its PROXY header, if any).
    fn send(&mut self, fi: usize, data: &[u8]) -> io::Result<()> {
        let now = self.now;
        let Some(f) = self.flows.get(fi) else {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        };
        send(f.upstream.as_raw_fd(), &f.header, data)?;
        f.requests += 1;
        f.last = now;
        f.backend.udp_in(data.len() as u64);
        let li = f.listener;
        self.touch(li, fi);
        Ok(())
    }

    // ---- backends to clients ----

    fn read_backend(&mut self, fi: usize, serial: u64) {
        let now = self.now;
        let Some(f) = self.flows.get(fi) else { return };
        if f.serial & 0x3fff_ffff != serial {
            return;
        }
        let li = f.listener;
        if self.tx_listener != li {
            self.flush();
            self.tx_listener = li;
        }
        for _ in 0..READS_PER_WAKE {
            if self.tx.room() == 0 {
                self.flush();
                self.tx_listener = li;
            }
            let Some(f) = self.flows.get(fi) else { return };
            let (fd, client, local) = (f.upstream.as_raw_fd(), f.client, f.local);
            let room = self.tx.room();
            let n = match self.tx.recv_connected(fd, room) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) if path_error(&e) => {
                    // A retry sends: only under the gate, within the lease.
                    let Some(gate) = self.listeners.get(li).map(|l| Arc::clone(&l.gate)) else {
                        return;
                    };
                    match serving(&gate) {
                        Some(_forwarding) => {
                            self.backend_failed(fi, &e);
                        }
                        None => self.end(fi, End::Closed),
                    }
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "UDP flow receive failed");
                    self.end(fi, End::Failed);
                    return;
                }
            };
            if n == 0 {
                break;
            }
            self.tx.address_last(n, client, local);
            let bytes = self.tx.bytes_of_last(n);
            let Some(f) = self.flows.get(fi) else { return };
            f.responses += n as u64;
            f.last = now;
            f.backend.udp_out(n as u64, bytes);
            if let Some(pending) = f.pending.take() {
                // Answered: the backend is there; nothing left to retry.
                self.first_bytes -= pending.first.as_ref().map_or(0, |d| d.len());
                f.backend.connect_succeeded();
            }
            self.touch(li, fi);
            if n < room {
                break;
            }
        }
        let Some(f) = self.flows.get(fi) else { return };
        let (requests, responses) = (f.requests, f.responses);
        let Some(l) = self.listeners.get(li) else { return };
        if let Some(per) = l.vip.table().settings.udp.responses {
            if responses >= requests.saturating_mul(u64::from(per)) {
                self.end(fi, End::Answered);
            }
        }
    }

    /// Sends the queued replies from their listener's socket, if the VIP
    /// is still served (under its gate: see the module docs).
    fn flush(&mut self) {
        if self.tx.len() == 0 {
            return;
        }
        let li = self.tx_listener;
        let Some(l) = self.listeners.get(li) else {
            self.tx.clear();
            return;
        };
        let (gate, stats, vip) = (Arc::clone(&l.gate), Arc::clone(&l.stats), Arc::clone(&l.vip));
        let (fd, v6) = (l.socket.as_raw_fd(), l.v6);
        let queued = self.tx.len();
        let Some(_forwarding) = serving(&gate) else {
            stats.dropped(DropReason::NotServing, queued as u64);
            self.tx.clear();
            return;
        };
        let (sent, bytes, error) = self.tx.send_all(fd, v6);
        stats
            .datagrams_out
            .fetch_add(sent as u64, std::sync::atomic::Ordering::Relaxed);
        vip.metrics().bytes_out.increment(bytes);
        if sent < queued {
            stats.dropped(DropReason::ReplyError, (queued - sent) as u64);
            if let (Some(e), Some(suppressed)) = (error, self.errors.allow()) {
                tracing::debug!(vip = vip.name(), error = %e, suppressed, "UDP replies not sent");
            }
        }
    }

    // ---- failures ----

    /// The path to flow `fi`'s backend failed (see [`path_error`]); a
    /// refusal counts against the backend as a failed connect. A flow still
    /// waiting for its first answer moves to another backend (within
    /// `retries`) and resends its first datagram if a copy was kept.
    /// The caller holds the VIP's gate (a retry sends).
    fn backend_failed(&mut self, fi: usize, e: &io::Error) -> Failover {
        let Some(f) = self.flows.get(fi) else {
            return Failover::Ended;
        };
        let li = f.listener;
        let Some(l) = self.listeners.get(li) else {
            return Failover::Ended;
        };
        let vip = Arc::clone(&l.vip);
        if backend_refused(e) {
            let table = vip.table();
            vip.metrics().connect_failures.increment(1);
            f.backend.connect_failed(Vip::now(), &table.settings.passive);
        }
        tracing::debug!(vip = vip.name(), backend = %f.backend.addr(), error = %e, "UDP flow's backend unreachable");
        let Some(mut pending) = f.pending.take() else {
            self.end(fi, End::Failed);
            return Failover::Ended;
        };
        pending.tried.push(pending.picked);
        let client = f.client;
        let retries = pending.table.settings.retries as usize;
        loop {
            if pending.tried.len() > retries {
                break;
            }
            let ctx = PickContext {
                client,
                cursor: vip.cursor(),
                now: Vip::now(),
                tried: &pending.tried,
                by_port: true,
            };
            let Some(i) = pending.table.pick(&ctx) else { break };
            let entry = &pending.table.entries[i];
            let upstream = match connected_socket(entry.backend.addr) {
                Ok(fd) => fd,
                Err(e) => {
                    // This host's fault (see `open`): no retry, no blame.
                    if pressure::is_local(&e) {
                        pressure::report(Op::Connect, vip.name(), &e);
                    }
                    break;
                }
            };
            vip.metrics().retries.increment(1);
            let (serial, state) = (self.serial + 1, Arc::clone(&entry.state));
            self.serial = serial;
            let fd = upstream.as_raw_fd();
            if self.register(fd, token(KIND_FLOW, fi, serial)).is_err() {
                break;
            }
            let Some(f) = self.flows.get(fi) else {
                self.first_bytes -= pending.first.as_ref().map_or(0, |d| d.len());
                return Failover::Ended;
            };
            f.serial = serial;
            f._active = state.start_connection();
            f.backend = state;
            // The old socket closes here (and leaves the epoll set).
            f.upstream = upstream;
            pending.picked = i;
            let resent = match &pending.first {
                None => Some(false),
                Some(d) => send(f.upstream.as_raw_fd(), &f.header, d).ok().map(|()| true),
            };
            if let Some(resent) = resent {
                f.pending = Some(pending);
                return Failover::Moved { resent };
            }
            // The new backend refused at once too: try the next.
            pending.tried.push(i);
        }
        // No retry left: the first datagram's copy goes with the flow.
        if let Some(f) = self.flows.get(fi) {
            f.pending = Some(pending);
        }
        self.end(fi, End::Failed);
        Failover::Ended
    }

    // ---- ending flows ----

    fn end(&mut self, fi: usize, how: End) {
        let Some(f) = self.flows.get(fi) else { return };
        let li = f.listener;
        if let Some(l) = self.listeners.get(li) {
            l.stats.ended(how);
        }
        self.forget_flow(fi);
    }

    /// Removes flow `fi` from every list and closes its socket.
    fn forget_flow(&mut self, fi: usize) {
        self.unlink(fi);
        let Some(f) = self.flows.remove(fi) else { return };
        if let Some(p) = &f.pending {
            self.first_bytes -= p.first.as_ref().map_or(0, |d| d.len());
        }
        if let Some(l) = self.listeners.get(f.listener) {
            if l.flows.get(&f.client) == Some(&fi) {
                l.flows.remove(&f.client);
            }
        }
        // Dropping `f` closes the socket, which leaves the epoll set.
    }

    /// Ends the flows idle past their VIP's timeout.
    fn expire(&mut self) {
        let now = self.now;
        for li in 0..self.listeners.capacity() {
            let Some(l) = self.listeners.get(li) else { continue };
            let idle = l.vip.table().settings.udp.idle_timeout;
            while let Some(head) = self.listeners.get(li).map(|l| l.head).filter(|&h| h != NIL) {
                if self
                    .flows
                    .get(head)
                    .is_none_or(|f| now.saturating_duration_since(f.last) < idle)
                {
                    break;
                }
                self.end(head, End::Expired);
            }
            // After a burst, the memory of its flows goes back.
            if let Some(l) = self.listeners.get(li) {
                if l.flows.is_empty() && l.flows.capacity() > 1024 {
                    l.flows.shrink_to_fit();
                }
            }
        }
        self.flows.shrink_if_empty();
    }

    /// How long to wait for events: until the next flow could expire, at
    /// most [`MAX_WAIT`].
    fn next_wait(&mut self) -> Duration {
        let now = Instant::now();
        let mut wait = MAX_WAIT;
        for li in 0..self.listeners.capacity() {
            let Some(l) = self.listeners.get(li) else { continue };
            let head = l.head;
            if head == NIL {
                continue;
            }
            let idle = l.vip.table().settings.udp.idle_timeout;
            if let Some(f) = self.flows.get(head) {
                wait = wait.min((f.last + idle).saturating_duration_since(now));
            }
        }
        wait.max(Duration::from_millis(1))
    }

    // ---- the activity list ----

    fn unlink(&mut self, fi: usize) {
        let Some(f) = self.flows.get(fi) else { return };
        let (prev, next, li) = (f.prev, f.next, f.listener);
        f.prev = NIL;
        f.next = NIL;
        if prev != NIL {
            if let Some(p) = self.flows.get(prev) {
                p.next = next;
            }
        }
        if next != NIL {
            if let Some(n) = self.flows.get(next) {
                n.prev = prev;
            }
        }
        if let Some(l) = self.listeners.get(li) {
            if l.head == fi {
                l.head = next;
            }
            if l.tail == fi {
                l.tail = prev;
            }
        }
    }

    fn push_tail(&mut self, li: usize, fi: usize) {
        let Some(l) = self.listeners.get(li) else { return };
        let old = l.tail;
        l.tail = fi;
        if l.head == NIL {
            l.head = fi;
        }
        if old != NIL {
            if let Some(o) = self.flows.get(old) {
                o.next = fi;
            }
        }
        if let Some(f) = self.flows.get(fi) {
            f.prev = old;
            f.next = NIL;
        }
    }

    /// Flow `fi` was active: it moves to the tail.
    fn touch(&mut self, li: usize, fi: usize) {
        if self.listeners.get(li).is_some_and(|l| l.tail == fi) {
            return;
        }
        self.unlink(fi);
        self.push_tail(li, fi);
    }
}

/// The current table of listener `li`'s VIP.
fn li_table(listeners: &Slab<Listener>, li: usize) -> Option<Arc<Table>> {
    listeners.peek(li).map(|l| l.vip.table())
}
