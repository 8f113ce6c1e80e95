//! The io_uring data plane: one ring per worker thread, driven by a plain
//! completion loop (no async runtime on the path of a byte).
//!
//! # Why
//! On this kind of machine a proxied keep-alive request costs about as much
//! in kernel crossings and wake-ups as in everything else. With epoll each
//! request is an `epoll_wait`, a `recv` and a `send` per direction, and each
//! `send` that wakes a peer may preempt the proxy on its way back to user
//! space. Here a worker queues every operation of a turn and hands them to
//! the kernel in one `io_uring_enter`, which also waits for the next
//! completions: one crossing per turn however many connections moved, and
//! the peers woken by our sends run while we wait, not in the middle of our
//! turn.
//!
//! # What a worker does
//! - **Accept**: one single-shot accept per listener at a time, armed only
//!   when the VIP has a connection slot, the process is not out of
//!   descriptors ([`pressure`]) and a backend socket is ready (the same
//!   "spare" rule as the epoll path: under a descriptor shortage clients
//!   wait in the backlog, not in a process that cannot reach a backend).
//!   Every accepted client is checked against the HA lease ([`lease`]).
//! - **Connect**: a connect linked to a timeout (`IORING_OP_LINK_TIMEOUT`),
//!   retried on other backends as the VIP's `retries` say; failures feed
//!   passive ejection; local errors (no port, no descriptor) blame no
//!   backend and wait for relief, as on the epoll path.
//! - **Copy**: a `recv` per direction that takes its buffer from a
//!   **provided-buffer ring** only when bytes arrive, so an idle connection
//!   holds no buffer at all; the bytes go out with one `send` from the same
//!   buffer, and only when it has all gone is the buffer returned and the
//!   next `recv` armed: at most one buffer per direction, so a slow reader
//!   slows its writer (backpressure) instead of growing memory. The pool
//!   grows when it runs dry (to [`MAX_BUFFERS`]).
//! - **Half-close**: end of stream one way shuts down writing the other
//!   way; the connection ends when both ways have. Shutdowns and closes go
//!   through the ring too, so a turn makes no other system call on the
//!   path of an established connection.
//! - **Idle timeout**: a deadline per connection in the worker's timer
//!   heap, checked against its last activity.
//! - **Splice**: with `copy = "splice"` a direction whose read fills a
//!   buffer moves on to splice(2) through a pipe from the worker's pool
//!   (the epoll data plane's `splice-auto` rule). io_uring's own splice
//!   runs on blocking kernel threads, one per operation in flight, so here
//!   the ring only waits for readiness (a poll) and the worker splices
//!   with direct non-blocking calls.
//!
//! # Safety of the ring
//! Every buffer or address an operation points at lives in a `Box` owned by
//! the connection or listener, which is freed only when no operation of it
//! is in flight (`inflight` counts them), or in the buffer pool, which lives
//! as long as the ring.
//!
//! # Choosing it
//! `data_plane = "auto"` (the default) probes at start ([`probe`]): the
//! ring flags and operations used here (kernel 6.1 or later) and a
//! provided-buffer ring. A kernel or sandbox that refuses any of them
//! (seccomp in containers often refuses `io_uring_setup`) gets the epoll
//! data plane, and the log says why.

// The ring shares memory with the kernel: pointers in submissions, the
// provided-buffer ring, descriptors from completions. Each `unsafe` says
// what it relies on.
#![allow(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use nix::fcntl::SpliceFFlags;
use socket2::SockAddr;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

use crate::balance::backend::{ActiveConnection, BackendState};
use crate::balance::selection::PickContext;
use crate::balance::table::{ClientSlot, Table, Vip};
use crate::dataplane::copy::{self, Pipe};
use crate::dataplane::pressure::{self, Op, RateLimit};
use crate::dataplane::{lease, proxy_protocol, workers};
use crate::settings::{CopyMode, ProxyProtocol, VipSettings};

/// Bytes one buffer holds: 16 KiB, as the epoll path's reads.
const CHUNK: usize = 16 * 1024;
/// Buffers a worker starts with.
const FIRST_BUFFERS: u16 = 64;
/// Buffers added each time the pool runs dry.
const GROW_BY: u16 = 64;
/// The most buffers a worker holds (128 MiB): beyond that, a direction
/// that finds none waits for one to come back.
const MAX_BUFFERS: u16 = 8192;
/// The buffer group id of the worker's pool.
const GROUP: u16 = 0;
/// Submission queue entries per ring.
const RING_ENTRIES: u32 = 1024;
/// How often a worker looks at its listeners' stop tokens, with nothing
/// else to do.
const TICK: Duration = Duration::from_millis(250);
/// Pipefuls a splicing direction moves before the worker turns to its
/// other connections.
const SPLICE_ROUNDS: u32 = 16;
/// How often a paused accept (connection limit, descriptor shortage)
/// looks again.
const RECHECK: Duration = Duration::from_millis(5);

/// What the control plane asks of a worker.
pub(crate) enum Command {
    /// Accept on `listener` (this worker's own clone) until `stop`.
    Listen {
        vip: Arc<Vip>,
        listener: std::net::TcpListener,
        stop: CancellationToken,
        tracker: TaskTracker,
    },
}

/// The control plane's handle on one io_uring worker.
#[derive(Debug)]
pub(crate) struct Handle {
    commands: mpsc::Sender<Command>,
    wake: Arc<OwnedFd>,
}

impl Handle {
    /// Hands `command` to the worker and wakes it.
    pub(crate) fn send(&self, command: Command) {
        if self.commands.send(command).is_err() {
            tracing::error!("an io_uring worker has stopped; command dropped");
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let n = unsafe { libc::write(self.wake.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
        if n != 8 {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot wake an io_uring worker");
        }
    }
}

/// Checks that this kernel and sandbox give a worker everything it uses.
pub(crate) fn probe() -> io::Result<()> {
    let ring = build_ring(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Accept::CODE, "accept"),
        (opcode::Connect::CODE, "connect"),
        (opcode::Recv::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::LinkTimeout::CODE, "link timeout"),
        (opcode::AsyncCancel::CODE, "cancel"),
        (opcode::Read::CODE, "read"),
        (opcode::Shutdown::CODE, "shutdown"),
        (opcode::Close::CODE, "close"),
        (opcode::PollAdd::CODE, "poll"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring has no {name} operation"),
            ));
        }
    }
    let pool = Pool::new(&ring)?;
    // The ring (and its registration of the pool) first.
    drop(ring);
    drop(pool);
    Ok(())
}

fn build_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        // One thread submits, and completions are run when it waits for
        // them (not by interrupting it): kernel 6.1.
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(entries)
}

/// Starts an io_uring worker thread named `name`, counted as worker
/// `index` for the balance between workers.
pub(crate) fn start(name: String, index: usize) -> io::Result<Handle> {
    // SAFETY: plain eventfd(2); the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let (commands, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let wake_fd = Arc::clone(&wake);
    std::thread::Builder::new().name(name).spawn(move || {
        workers::set_worker(index);
        match Worker::new(rx, wake_fd) {
            Ok(mut worker) => {
                let _ = ready_tx.send(Ok(()));
                worker.run();
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    })?;
    ready_rx
        .recv()
        .map_err(|_| io::Error::other("the io_uring worker died while starting"))??;
    Ok(Handle { commands, wake })
}

/// What a completion belongs to: the low byte of its user data; the rest
/// is the connection's or listener's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Wake = 1,
    Accept = 2,
    Connect = 3,
    ConnectTimeout = 4,
    /// Client → backend read.
    Recv0 = 5,
    /// Backend → client read.
    Recv1 = 6,
    Send0 = 7,
    Send1 = 8,
    Header = 9,
    Cancel = 10,
    /// A half-close (`shutdown(SHUT_WR)`) of a connection's socket.
    Shutdown = 11,
    /// The close of a freed connection's socket.
    Closed = 12,
    /// Splice mode: the client (direction 0) or backend (1) is readable.
    Readable0 = 13,
    Readable1 = 14,
    /// Splice mode: the backend (direction 0) or client (1) is writable.
    Writable0 = 15,
    Writable1 = 16,
}

fn token(index: usize, kind: Kind) -> u64 {
    ((index as u64) << 8) | kind as u64
}

fn untoken(data: u64) -> Option<(usize, Kind)> {
    let index = (data >> 8) as usize;
    let kind = match data & 0xff {
        1 => Kind::Wake,
        2 => Kind::Accept,
        3 => Kind::Connect,
        4 => Kind::ConnectTimeout,
        5 => Kind::Recv0,
        6 => Kind::Recv1,
        7 => Kind::Send0,
        8 => Kind::Send1,
        9 => Kind::Header,
        10 => Kind::Cancel,
        11 => Kind::Shutdown,
        12 => Kind::Closed,
        13 => Kind::Readable0,
        14 => Kind::Readable1,
        15 => Kind::Writable0,
        16 => Kind::Writable1,
        _ => return None,
    };
    Some((index, kind))
}

/// The worker's provided buffers: a ring the kernel takes buffers from as
/// reads complete, and that we give them back to once sent.
struct Pool {
    ring: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    /// Our copy of the ring's tail.
    tail: u16,
    buffers: Vec<Box<[u8]>>,
}

impl Pool {
    fn new(ring: &IoUring) -> io::Result<Pool> {
        let layout = std::alloc::Layout::from_size_align(
            usize::from(MAX_BUFFERS) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: a non-zero, page-aligned layout; zeroed as the kernel
        // expects a fresh ring (tail 0).
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        if mem.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut pool = Pool {
            ring: mem.cast(),
            layout,
            tail: 0,
            buffers: Vec::new(),
        };
        // SAFETY: the ring memory lives until `Pool::drop`, which
        // unregisters it first (and the pool never outlives its ring: the
        // worker drops it before the ring).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(mem as u64, MAX_BUFFERS, GROUP, 0)?;
        }
        pool.grow(FIRST_BUFFERS);
        Ok(pool)
    }

    /// Adds up to `n` new buffers; false when the pool is at its bound.
    fn grow(&mut self, n: u16) -> bool {
        let have = self.buffers.len();
        let room = usize::from(MAX_BUFFERS) - have;
        let n = usize::from(n).min(room);
        for _ in 0..n {
            self.buffers.push(vec![0u8; CHUNK].into_boxed_slice());
            let id = u16::try_from(self.buffers.len() - 1).expect("bounded by MAX_BUFFERS");
            self.put(id);
        }
        n > 0
    }

    /// Gives buffer `id` back to the kernel.
    fn put(&mut self, id: u16) {
        let mask = MAX_BUFFERS - 1;
        let buffer = &mut self.buffers[usize::from(id)];
        // SAFETY: `tail & mask` is inside the ring; the kernel reads an
        // entry only once the tail below is published past it.
        unsafe {
            let entry = &mut *self.ring.add(usize::from(self.tail & mask));
            entry.set_addr(buffer.as_mut_ptr() as u64);
            entry.set_len(CHUNK as u32);
            entry.set_bid(id);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    fn bytes(&self, id: u16, len: usize) -> &[u8] {
        &self.buffers[usize::from(id)][..len]
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The registration goes with the ring, dropped before the pool
        // (see `Worker`'s field order, and `probe`).
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ring.cast(), self.layout) };
    }
}

/// A backend socket made before its client is accepted (see the module
/// docs and `proxy::Spare`).
struct Spare {
    fd: OwnedFd,
    v4: bool,
}

fn tcp_socket(v4: bool) -> io::Result<OwnedFd> {
    let family = if v4 { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2), checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    socket2::SockRef::from(&fd).set_nodelay(true)?;
    Ok(fd)
}

impl Spare {
    fn new(v4: bool) -> io::Result<Spare> {
        Ok(Spare {
            fd: tcp_socket(v4)?,
            v4,
        })
    }
}

struct Listener {
    vip: Arc<Vip>,
    socket: std::net::TcpListener,
    stop: CancellationToken,
    tracker: TaskTracker,
    serial: u64,
    /// Where the pending accept writes the client's address.
    addr: Box<(libc::sockaddr_storage, libc::socklen_t)>,
    /// An accept is in flight.
    pending: bool,
    /// A cancel of that accept has been sent.
    cancelling: bool,
    /// A timer will look at this listener again.
    paused: bool,
    slot: Option<ClientSlot>,
    spare: Option<Spare>,
    /// Already left one connection to the other workers.
    deferred: bool,
    /// The connection-limit pause was counted.
    at_limit: bool,
    errors: RateLimit,
}

/// One direction of a connection's copy.
#[derive(Debug, Default)]
struct Direction {
    /// The buffer holding bytes not yet sent, and how many.
    buffer: Option<(u16, u32)>,
    /// Bytes of it sent.
    sent: u32,
    /// The read that filled it left more in the socket: more bytes, or the
    /// peer's FIN (the kernel reports a pending FIN as one byte more).
    more: bool,
    /// End of stream read.
    ended: bool,
    /// Splice mode, and a read has filled a buffer: this direction now
    /// moves its bytes through a pipe.
    splicing: bool,
    /// The pipe holding bytes on their way, and how many.
    pipe: Option<(Pipe, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    /// A connect failed; the next starts once its timeout has completed.
    Retrying,
    /// Out of local resources: waiting for relief before trying again.
    WaitingRelief,
    Header,
    Copying,
}

struct Conn {
    vip: Arc<Vip>,
    serial: u64,
    client: OwnedFd,
    /// The backend socket; a spare until connected.
    backend: Option<OwnedFd>,
    v4: bool,
    peer: SocketAddr,
    phase: Phase,
    inflight: u32,
    /// Set on an error or timeout: no new operation, freed once the
    /// in-flight ones have completed.
    aborting: bool,
    settings: Arc<VipSettings>,
    /// The table of the first attempt, for every retry.
    table: Option<Arc<Table>>,
    tried: Vec<usize>,
    attempt: u32,
    picked: usize,
    local_wait_ends: Option<Instant>,
    /// Where the in-flight connect goes, and its timeout.
    addr: SockAddr,
    timeout: types::Timespec,
    header: Vec<u8>,
    header_sent: usize,
    dirs: [Direction; 2],
    last_activity: Instant,
    backend_state: Option<Arc<BackendState>>,
    _active: Option<ActiveConnection>,
    _slot: ClientSlot,
    _load: workers::Load,
    _tracked: TaskTrackerToken,
}

impl Conn {
    fn fd(&self, side: usize) -> RawFd {
        if side == 0 {
            self.client.as_raw_fd()
        } else {
            self.backend.as_ref().map_or(-1, AsRawFd::as_raw_fd)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Tick,
    Listener(usize, u64),
    Relief(usize, u64),
    Idle(usize, u64),
}

/// A slab: stable indices, reused after removal.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Slab<T> {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, item: T) -> usize {
        if let Some(i) = self.free.pop() {
            self.items[i] = Some(item);
            i
        } else {
            self.items.push(Some(item));
            self.items.len() - 1
        }
    }

    fn get(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i).and_then(Option::as_mut)
    }

    fn remove(&mut self, i: usize) -> Option<T> {
        let item = self.items.get_mut(i).and_then(Option::take);
        if item.is_some() {
            self.free.push(i);
        }
        item
    }
}

struct Worker {
    // Field order is drop order: the pool's ring memory must outlive the
    // ring's registration of it, so the ring goes first.
    ring: IoUring,
    pool: Pool,
    commands: mpsc::Receiver<Command>,
    wake: Arc<OwnedFd>,
    wake_buffer: Box<u64>,
    listeners: Slab<Listener>,
    conns: Slab<Box<Conn>>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    /// Directions that found the pool empty, waiting for a buffer.
    starved: VecDeque<(usize, u64, usize)>,
    completions: Vec<(u64, i32, u32)>,
    serial: u64,
    now: Instant,
}

impl Worker {
    fn new(commands: mpsc::Receiver<Command>, wake: Arc<OwnedFd>) -> io::Result<Worker> {
        let ring = build_ring(RING_ENTRIES)?;
        let pool = Pool::new(&ring)?;
        let now = Instant::now();
        let mut worker = Worker {
            ring,
            pool,
            commands,
            wake,
            wake_buffer: Box::new(0),
            listeners: Slab::new(),
            conns: Slab::new(),
            timers: BinaryHeap::new(),
            starved: VecDeque::new(),
            completions: Vec::with_capacity(256),
            serial: 0,
            now,
        };
        worker.arm_wake();
        worker.timers.push(Reverse((now + TICK, Timer::Tick)));
        Ok(worker)
    }

    fn run(&mut self) {
        loop {
            self.now = Instant::now();
            self.fire_timers();
            let wait = self
                .timers
                .peek()
                .map_or(TICK, |Reverse((at, _))| at.saturating_duration_since(self.now));
            let ts = types::Timespec::from(wait);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; retrying");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            self.completions.clear();
            self.completions
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            self.now = Instant::now();
            for i in 0..self.completions.len() {
                let (data, result, flags) = self.completions[i];
                self.complete(data, result, flags);
            }
        }
    }

    /// Queues `entry`, handing the queue to the kernel first if it is full.
    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every pointer in our entries outlives the operation
            // (see the module docs).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::warn!(error = %e, "io_uring submit failed");
            }
        }
    }

    /// Queues two linked entries with no submission between them.
    fn push_linked(&mut self, first: &squeue::Entry, second: &squeue::Entry) {
        {
            let sq = self.ring.submission();
            let full = sq.capacity() - sq.len() < 2;
            drop(sq);
            if full {
                if let Err(e) = self.ring.submit() {
                    tracing::warn!(error = %e, "io_uring submit failed");
                }
            }
        }
        self.push(first);
        self.push(second);
    }

    fn arm_wake(&mut self) {
        let buffer: *mut u64 = &mut *self.wake_buffer;
        let entry = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buffer.cast(), 8)
            .build()
            .user_data(token(0, Kind::Wake));
        self.push(&entry);
    }

    fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    fn complete(&mut self, data: u64, result: i32, flags: u32) {
        let Some((index, kind)) = untoken(data) else { return };
        match kind {
            Kind::Wake => {
                while let Ok(command) = self.commands.try_recv() {
                    self.command(command);
                }
                self.arm_wake();
            }
            Kind::Accept => self.accepted(index, result),
            Kind::Cancel | Kind::Closed => {}
            Kind::Shutdown => {
                if let Some(c) = self.conns.get(index) {
                    c.inflight -= 1;
                    self.op_done(index);
                }
            }
            Kind::Connect => self.connected(index, result),
            Kind::ConnectTimeout => self.connect_timeout_done(index),
            Kind::Header => self.header_sent(index, result),
            Kind::Recv0 => self.received(index, 0, result, flags),
            Kind::Recv1 => self.received(index, 1, result, flags),
            Kind::Send0 => self.sent(index, 0, result),
            Kind::Send1 => self.sent(index, 1, result),
            Kind::Readable0 | Kind::Writable0 => self.ready(index, 0, result),
            Kind::Readable1 | Kind::Writable1 => self.ready(index, 1, result),
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Listen {
                vip,
                listener,
                stop,
                tracker,
            } => {
                let local = listener.local_addr().ok();
                tracing::info!(vip = vip.name(), listen = ?local, "accepting (io_uring)");
                let serial = self.next_serial();
                let index = self.listeners.insert(Listener {
                    vip,
                    socket: listener,
                    stop,
                    tracker,
                    serial,
                    // SAFETY: all-zero is a valid sockaddr_storage.
                    addr: Box::new((unsafe { std::mem::zeroed() }, 0)),
                    pending: false,
                    cancelling: false,
                    paused: false,
                    slot: None,
                    spare: None,
                    deferred: false,
                    at_limit: false,
                    errors: RateLimit::new(Duration::from_secs(1)),
                });
                self.arm_accept(index);
            }
        }
    }

    // ---- timers ----

    fn fire_timers(&mut self) {
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Tick => {
                    self.tick();
                    self.timers.push(Reverse((self.now + TICK, Timer::Tick)));
                }
                Timer::Listener(index, serial) => {
                    if let Some(l) = self.listeners.get(index).filter(|l| l.serial == serial) {
                        l.paused = false;
                        self.arm_accept(index);
                    }
                }
                Timer::Relief(index, serial) => {
                    if self.conns.get(index).is_some_and(|c| c.serial == serial) {
                        self.waited_for_relief(index);
                    }
                }
                Timer::Idle(index, serial) => {
                    if self.conns.get(index).is_some_and(|c| c.serial == serial) {
                        self.check_idle(index);
                    }
                }
            }
        }
    }

    /// Stops the listeners whose VIP stopped serving, and drops timers of
    /// connections that have ended.
    fn tick(&mut self) {
        // Each live connection or listener has at most a couple of timers;
        // ended ones leave theirs until they fire. Past twice the live
        // count, sweep (bounded memory under churn with long timeouts).
        let live = self.conns.items.len() + self.listeners.items.len();
        if self.timers.len() > 2 * live + 64 {
            let (conns, listeners) = (&self.conns, &self.listeners);
            self.timers.retain(|Reverse((_, timer))| match *timer {
                Timer::Tick => true,
                Timer::Listener(i, serial) => listeners
                    .items
                    .get(i)
                    .and_then(Option::as_ref)
                    .is_some_and(|l| l.serial == serial),
                Timer::Relief(i, serial) | Timer::Idle(i, serial) => conns
                    .items
                    .get(i)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| c.serial == serial),
            });
        }
        for index in 0..self.listeners.items.len() {
            let Some(l) = self.listeners.get(index) else { continue };
            if !l.stop.is_cancelled() {
                continue;
            }
            if !l.pending {
                self.remove_listener(index);
            } else if !l.cancelling {
                l.cancelling = true;
                let entry = opcode::AsyncCancel::new(token(index, Kind::Accept))
                    .build()
                    .user_data(token(index, Kind::Cancel));
                self.push(&entry);
            }
        }
    }

    fn pause_listener(&mut self, index: usize, wait: Duration) {
        let Some(l) = self.listeners.get(index) else { return };
        if l.paused {
            return;
        }
        l.paused = true;
        let serial = l.serial;
        self.timers
            .push(Reverse((self.now + wait, Timer::Listener(index, serial))));
    }

    fn remove_listener(&mut self, index: usize) {
        if let Some(l) = self.listeners.remove(index) {
            tracing::info!(vip = l.vip.name(), listen = ?l.socket.local_addr().ok(), "stopped accepting");
        }
    }

    // ---- accept ----

    /// Arms the listener's accept if it may take a connection now;
    /// otherwise pauses it for a moment.
    fn arm_accept(&mut self, index: usize) {
        let Some(l) = self.listeners.get(index) else { return };
        if l.pending || l.paused {
            return;
        }
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
        if !l.deferred && workers::should_defer_accept() {
            l.deferred = true;
            return self.pause_listener(index, workers::ACCEPT_DEFER);
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

    fn accepted(&mut self, index: usize, result: i32) {
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
            backend_state: None,
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

    // ---- connect ----

    /// Picks a backend and connects to it, or ends the client when none is
    /// left to try.
    fn connect(&mut self, index: usize) {
        let now = self.now;
        let Some(c) = self.conns.get(index) else { return };
        let Some(table) = c.table.clone() else { return };
        if c.attempt > c.settings.retries {
            return self.no_backend(index);
        }
        let ctx = PickContext {
            client: c.peer,
            cursor: c.vip.cursor(),
            now: Vip::now(),
            tried: &c.tried,
        };
        let Some(i) = table.pick(&ctx) else {
            return self.no_backend(index);
        };
        let entry = &table.entries[i];
        let addr = entry.backend.addr;
        if c.attempt > 0 {
            c.vip.metrics().retries.increment(1);
        }
        c.picked = i;
        // A socket of the backend's family: the spare, or a new one (the
        // wrong-family spare closed first: its descriptor is the one the
        // new socket may need).
        if c.backend.is_none() || c.v4 != addr.is_ipv4() {
            c.backend = None;
            match tcp_socket(addr.is_ipv4()) {
                Ok(fd) => {
                    c.backend = Some(fd);
                    c.v4 = addr.is_ipv4();
                }
                Err(e) if pressure::is_local(&e) => {
                    pressure::report(Op::Connect, c.vip.name(), &e);
                    return self.wait_for_relief(index, now);
                }
                Err(e) => {
                    tracing::debug!(vip = c.vip.name(), error = %e, "cannot make a backend socket");
                    return self.no_backend(index);
                }
            }
        }
        c.phase = Phase::Connecting;
        c.addr = SockAddr::from(addr);
        c.timeout = types::Timespec::from(c.settings.connect_timeout);
        c.inflight += 2;
        let fd = c.fd(1);
        let connect = opcode::Connect::new(types::Fd(fd), c.addr.as_ptr().cast(), c.addr.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(token(index, Kind::Connect));
        let timeout: *const types::Timespec = &c.timeout;
        let timeout = opcode::LinkTimeout::new(timeout)
            .build()
            .user_data(token(index, Kind::ConnectTimeout));
        self.push_linked(&connect, &timeout);
    }

    fn connected(&mut self, index: usize, result: i32) {
        let now = self.now;
        let Some(c) = self.conns.get(index) else { return };
        c.inflight -= 1;
        if c.aborting {
            return self.op_done(index);
        }
        let Some(table) = c.table.clone() else { return };
        let entry = &table.entries[c.picked];
        if result == 0 {
            entry.state.connect_succeeded();
            c._active = Some(entry.state.start_connection());
            c.backend_state = Some(Arc::clone(&entry.state));
            c.table = None;
            if c.settings.proxy_protocol != ProxyProtocol::Off {
                let local = socket2::SockRef::from(&c.client)
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket());
                match local {
                    Some(local) => {
                        c.header = proxy_protocol::header(c.settings.proxy_protocol, c.peer, local);
                        c.phase = Phase::Header;
                        self.send_header(index);
                    }
                    None => self.abort(index),
                }
            } else {
                self.start_copy(index);
            }
            return;
        }
        let e = if result == -libc::ECANCELED {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connect to {} timed out after {:?}",
                    entry.backend.addr, c.settings.connect_timeout
                ),
            )
        } else {
            io::Error::from_raw_os_error(-result)
        };
        // The socket is spent either way.
        c.backend = None;
        if pressure::is_local(&e) {
            // Our own shortage, not the backend's fault: no failure, no
            // ejection, no attempt used.
            pressure::report(Op::Connect, c.vip.name(), &e);
            return self.wait_for_relief(index, now);
        }
        c.vip.metrics().connect_failures.increment(1);
        entry.state.connect_failed(Vip::now(), &c.settings.passive);
        tracing::debug!(vip = c.vip.name(), backend = %entry.backend.addr, error = %e, attempt = c.attempt, "backend connect failed");
        let picked = c.picked;
        c.tried.push(picked);
        c.attempt += 1;
        if c.inflight > 0 {
            // The linked timeout's completion is still to come: the next
            // attempt starts from there.
            c.phase = Phase::Retrying;
            return;
        }
        self.connect(index);
    }

    /// The connect's linked timeout completed (fired, or cancelled by the
    /// connect completing first).
    fn connect_timeout_done(&mut self, index: usize) {
        let Some(c) = self.conns.get(index) else { return };
        c.inflight -= 1;
        if !c.aborting && c.phase == Phase::Retrying && c.inflight == 0 {
            return self.connect(index);
        }
        self.op_done(index);
    }

    /// Waits (a timer) for a connection to end somewhere, within
    /// [`pressure::CLIENT_WAIT`] of the first wait.
    fn wait_for_relief(&mut self, index: usize, now: Instant) {
        let Some(c) = self.conns.get(index) else { return };
        let ends = *c.local_wait_ends.get_or_insert(now + pressure::CLIENT_WAIT);
        if now >= ends {
            c.vip.metrics().local_resource_closes.increment(1);
            tracing::warn!(vip = c.vip.name(), client = %c.peer, waited = ?pressure::CLIENT_WAIT, "out of local resources for too long; closing client");
            return self.finish(index);
        }
        c.phase = Phase::WaitingRelief;
        let serial = c.serial;
        self.timers.push(Reverse((now + RECHECK, Timer::Relief(index, serial))));
    }

    fn waited_for_relief(&mut self, index: usize) {
        let now = self.now;
        let Some(c) = self.conns.get(index) else { return };
        if c.phase != Phase::WaitingRelief || c.inflight > 0 {
            if c.phase == Phase::WaitingRelief {
                let serial = c.serial;
                self.timers.push(Reverse((now + RECHECK, Timer::Relief(index, serial))));
            }
            return;
        }
        if pressure::under_pressure() {
            return self.wait_for_relief(index, now);
        }
        c.local_wait_ends = None;
        self.connect(index);
    }

    fn no_backend(&mut self, index: usize) {
        let Some(c) = self.conns.get(index) else { return };
        c.vip.metrics().no_backend.increment(1);
        tracing::warn!(vip = c.vip.name(), client = %c.peer, tried = c.tried.len(), "no backend reachable; closing client");
        self.finish(index);
    }

    // ---- PROXY header ----

    fn send_header(&mut self, index: usize) {
        let Some(c) = self.conns.get(index) else { return };
        let rest = &c.header[c.header_sent..];
        let entry = opcode::Send::new(types::Fd(c.fd(1)), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token(index, Kind::Header));
        c.inflight += 1;
        self.push(&entry);
    }

    fn header_sent(&mut self, index: usize, result: i32) {
        let Some(c) = self.conns.get(index) else { return };
        c.inflight -= 1;
        if c.aborting || result <= 0 {
            if !c.aborting {
                tracing::debug!(vip = c.vip.name(), client = %c.peer, error = %io::Error::from_raw_os_error(-result), "cannot send the PROXY header");
            }
            self.abort(index);
            return self.op_done(index);
        }
        c.header_sent += result as usize;
        if c.header_sent < c.header.len() {
            return self.send_header(index);
        }
        c.header = Vec::new();
        self.start_copy(index);
    }

    // ---- copy ----

    fn start_copy(&mut self, index: usize) {
        let now = self.now;
        let Some(c) = self.conns.get(index) else { return };
        c.phase = Phase::Copying;
        c.last_activity = now;
        let (serial, idle) = (c.serial, c.settings.idle_timeout);
        self.timers.push(Reverse((now + idle, Timer::Idle(index, serial))));
        self.recv(index, 0);
        self.recv(index, 1);
    }

    fn recv(&mut self, index: usize, dir: usize) {
        let Some(c) = self.conns.get(index) else { return };
        let kind = if dir == 0 { Kind::Recv0 } else { Kind::Recv1 };
        // Direction 0 reads the client, 1 the backend.
        let entry = opcode::Recv::new(types::Fd(c.fd(dir)), std::ptr::null_mut(), CHUNK as u32)
            .buf_group(GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(token(index, kind));
        c.inflight += 1;
        self.push(&entry);
    }

    fn received(&mut self, index: usize, dir: usize, result: i32, flags: u32) {
        let now = self.now;
        let buffer = cqueue::buffer_select(flags);
        let Some(c) = self.conns.get(index) else {
            if let Some(id) = buffer {
                self.give_back(id);
            }
            return;
        };
        c.inflight -= 1;
        if c.aborting {
            if let Some(id) = buffer {
                self.give_back(id);
            }
            return self.op_done(index);
        }
        if result > 0 {
            let Some(id) = buffer else {
                // A read with bytes always names its buffer.
                self.abort(index);
                return self.op_done(index);
            };
            c.last_activity = now;
            let counter = if dir == 0 {
                &c.vip.metrics().bytes_in
            } else {
                &c.vip.metrics().bytes_out
            };
            counter.increment(result as u64);
            c.dirs[dir].buffer = Some((id, result as u32));
            c.dirs[dir].sent = 0;
            c.dirs[dir].more = cqueue::sock_nonempty(flags);
            if c.settings.copy == CopyMode::Splice && result as usize == CHUNK {
                // Bulk: once this buffer is out, splice (as the epoll data
                // plane and HAProxy's `splice-auto` decide).
                c.dirs[dir].splicing = true;
            }
            return self.send(index, dir);
        }
        if result < 0 && result != -libc::ENOBUFS {
            tracing::debug!(vip = c.vip.name(), client = %c.peer, error = %io::Error::from_raw_os_error(-result), "connection ended with an error");
        }
        let serial = c.serial;
        if let Some(id) = buffer {
            self.give_back(id);
        }
        if result == 0 {
            return self.end_of_stream(index, dir);
        }
        if result == -libc::ENOBUFS {
            // The pool ran dry: grow it, or wait for a buffer to come back.
            if self.pool.grow(GROW_BY) {
                return self.recv(index, dir);
            }
            self.starved.push_back((index, serial, dir));
            return;
        }
        self.abort(index);
        self.op_done(index);
    }

    fn send(&mut self, index: usize, dir: usize) {
        let Some(c) = self.conns.get(index) else { return };
        let Some((id, len)) = c.dirs[dir].buffer else { return };
        let sent = c.dirs[dir].sent;
        let bytes = &self.pool.bytes(id, len as usize)[sent as usize..];
        let kind = if dir == 0 { Kind::Send0 } else { Kind::Send1 };
        // With more to read (or the FIN), MSG_MORE holds these bytes until
        // the next send or our shutdown, so the last bytes and the FIN
        // leave in one segment (as the epoll data plane does). The next
        // read is armed as soon as this send completes, and it finds the
        // bytes or the FIN at once.
        let more = if c.dirs[dir].more { libc::MSG_MORE } else { 0 };
        // Direction 0 writes to the backend, 1 to the client.
        let entry = opcode::Send::new(types::Fd(c.fd(1 - dir)), bytes.as_ptr(), len - sent)
            .flags(libc::MSG_NOSIGNAL | more)
            .build()
            .user_data(token(index, kind));
        c.inflight += 1;
        self.push(&entry);
    }

    fn sent(&mut self, index: usize, dir: usize, result: i32) {
        let now = self.now;
        let Some(c) = self.conns.get(index) else { return };
        c.inflight -= 1;
        if c.aborting || result < 0 {
            if !c.aborting {
                tracing::debug!(vip = c.vip.name(), client = %c.peer, error = %io::Error::from_raw_os_error(-result), "connection ended with an error");
            }
            let held = c.dirs[dir].buffer.take();
            if let Some((id, _)) = held {
                self.give_back(id);
            }
            self.abort(index);
            return self.op_done(index);
        }
        c.last_activity = now;
        c.dirs[dir].sent += result as u32;
        let Some((id, len)) = c.dirs[dir].buffer else { return };
        if c.dirs[dir].sent < len {
            return self.send(index, dir);
        }
        c.dirs[dir].buffer = None;
        let splicing = c.dirs[dir].splicing;
        self.give_back(id);
        if splicing {
            self.splice_pump(index, dir);
        } else {
            self.recv(index, dir);
        }
    }

    // ---- splice ----
    //
    // io_uring runs splice on its blocking worker threads, one per
    // operation in flight, so a direction that splices waits for
    // readiness on the ring (a poll) and splices with direct, non-blocking
    // calls: the epoll data plane's method, with the ring for readiness.

    /// Moves what `dir`'s source has into a pipe and on to the other side,
    /// until the source has nothing (then a poll for readable), the other
    /// side is full (a poll for writable), or [`SPLICE_ROUNDS`] pipefuls
    /// have moved (a poll too, which completes at once: the worker's other
    /// connections get their turn).
    fn splice_pump(&mut self, index: usize, dir: usize) {
        let now = self.now;
        let Some(c) = self.conns.get(index) else { return };
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let (src, dst) = if dir == 0 {
            (Some(&c.client), c.backend.as_ref())
        } else {
            (c.backend.as_ref(), Some(&c.client))
        };
        let (Some(src), Some(dst)) = (src, dst) else { return };
        let mut wait_for = None;
        let mut failed = None;
        let mut ended = false;
        let mut rounds = 0;
        loop {
            // Out: empty the pipe into the other side.
            if let Some((pipe, in_pipe)) = c.dirs[dir].pipe.as_mut() {
                while *in_pipe > 0 {
                    match nix::fcntl::splice(&pipe.0, None, dst, None, *in_pipe, flags) {
                        Ok(m) => {
                            *in_pipe -= m;
                            c.last_activity = now;
                        }
                        Err(nix::errno::Errno::EAGAIN) => break,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if failed.is_some() {
                    // The pipe still holds bytes: closed with the
                    // connection, never pooled.
                    break;
                }
                if *in_pipe > 0 {
                    wait_for = Some((1 - dir, libc::POLLOUT));
                    break;
                }
                if let Some((pipe, _)) = c.dirs[dir].pipe.take() {
                    copy::return_pipe(pipe);
                }
            }
            rounds += 1;
            if rounds > SPLICE_ROUNDS {
                wait_for = Some((dir, libc::POLLIN));
                break;
            }
            // In: from the source into a pipe.
            let pipe = match copy::take_pipe() {
                Ok(pipe) => pipe,
                Err(e) => {
                    // No pipe (out of descriptors): this read goes through
                    // a buffer; the next tries for a pipe again.
                    tracing::debug!(error = %e, "no pipe for splice; copying through a buffer");
                    return self.recv(index, dir);
                }
            };
            match nix::fcntl::splice(src, None, &pipe.1, None, 1 << 20, flags) {
                Ok(0) => {
                    copy::return_pipe(pipe);
                    ended = true;
                    break;
                }
                Ok(n) => {
                    c.last_activity = now;
                    let counter = if dir == 0 {
                        &c.vip.metrics().bytes_in
                    } else {
                        &c.vip.metrics().bytes_out
                    };
                    counter.increment(n as u64);
                    c.dirs[dir].pipe = Some((pipe, n));
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    copy::return_pipe(pipe);
                    wait_for = Some((dir, libc::POLLIN));
                    break;
                }
                Err(e) => {
                    copy::return_pipe(pipe);
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            tracing::debug!(vip = c.vip.name(), client = %c.peer, error = %e, "connection ended with an error");
            self.abort(index);
            return self.op_done(index);
        }
        if ended {
            return self.end_of_stream(index, dir);
        }
        if let Some((side, events)) = wait_for {
            let kind = match (dir, events) {
                (0, libc::POLLIN) => Kind::Readable0,
                (_, libc::POLLIN) => Kind::Readable1,
                (0, _) => Kind::Writable0,
                _ => Kind::Writable1,
            };
            let entry = opcode::PollAdd::new(types::Fd(c.fd(side)), events as u32)
                .build()
                .user_data(token(index, kind));
            c.inflight += 1;
            self.push(&entry);
        }
    }

    /// A splicing direction's source became readable, or its destination
    /// writable.
    fn ready(&mut self, index: usize, dir: usize, result: i32) {
        let Some(c) = self.conns.get(index) else { return };
        c.inflight -= 1;
        if c.aborting || result < 0 {
            self.abort(index);
            return self.op_done(index);
        }
        self.splice_pump(index, dir);
    }

    /// `dir`'s source sent FIN: pass it on, or end the connection if the
    /// other way has ended too (the close sends that FIN).
    fn end_of_stream(&mut self, index: usize, dir: usize) {
        let Some(c) = self.conns.get(index) else { return };
        c.dirs[dir].ended = true;
        if !c.dirs[1 - dir].ended {
            // A direct call: io_uring runs shutdowns on its blocking
            // worker threads (a thread wake-up each, measured). A failure
            // (the peer already gone) shows in the other direction.
            let dst = if dir == 0 { c.backend.as_ref() } else { Some(&c.client) };
            if let Some(dst) = dst {
                if let Err(e) = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
                    tracing::debug!(error = %e, "shutdown(SHUT_WR) failed");
                }
            }
        }
        self.op_done(index);
    }

    fn give_back(&mut self, id: u16) {
        self.pool.put(id);
        // A direction waiting for a buffer may read again.
        while let Some((index, serial, dir)) = self.starved.pop_front() {
            if self.conns.get(index).is_some_and(|c| c.serial == serial && !c.aborting) {
                self.recv(index, dir);
                break;
            }
        }
    }

    fn check_idle(&mut self, index: usize) {
        let now = self.now;
        let Some(c) = self.conns.get(index) else { return };
        if c.aborting {
            return;
        }
        let deadline = c.last_activity + c.settings.idle_timeout;
        if now < deadline {
            let serial = c.serial;
            self.timers.push(Reverse((deadline, Timer::Idle(index, serial))));
            return;
        }
        c.vip.metrics().idle_timeouts.increment(1);
        tracing::debug!(vip = c.vip.name(), client = %c.peer, "idle timeout");
        self.abort(index);
        self.op_done(index);
    }

    /// Ends the connection early: its in-flight operations complete (the
    /// shutdowns wake them), then it is freed.
    fn abort(&mut self, index: usize) {
        let Some(c) = self.conns.get(index) else { return };
        if c.aborting {
            return;
        }
        c.aborting = true;
        for fd in [Some(&c.client), c.backend.as_ref()].into_iter().flatten() {
            let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Both);
        }
        // Waiting for a buffer is not an operation in flight.
        self.starved.retain(|&(i, _, _)| i != index);
    }

    /// Frees the connection if nothing of it is in flight and it is done.
    fn op_done(&mut self, index: usize) {
        let Some(c) = self.conns.get(index) else { return };
        if c.inflight > 0 {
            return;
        }
        let done = c.aborting || (c.phase == Phase::Copying && c.dirs[0].ended && c.dirs[1].ended);
        if done {
            self.finish(index);
        }
    }

    fn finish(&mut self, index: usize) {
        if let Some(c) = self.conns.get(index) {
            if c.inflight > 0 {
                // Freed when the last operation completes.
                c.aborting = true;
                return;
            }
        }
        if let Some(c) = self.conns.remove(index) {
            let c = *c;
            // Closed on the ring with the rest of the turn. Nothing of the
            // connection is in flight, so nothing else uses them.
            for fd in [Some(c.client), c.backend].into_iter().flatten() {
                let entry = opcode::Close::new(types::Fd(fd.into_raw_fd()))
                    .build()
                    .user_data(token(0, Kind::Closed));
                self.push(&entry);
            }
            // Its descriptors are (about to be) free again.
            pressure::relieve();
        }
    }
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: the kernel filled `storage` with `len` bytes of an address.
    let addr = unsafe { SockAddr::new(*storage, len) };
    addr.as_socket()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for kind in [
            Kind::Wake,
            Kind::Accept,
            Kind::Connect,
            Kind::ConnectTimeout,
            Kind::Recv0,
            Kind::Recv1,
            Kind::Send0,
            Kind::Send1,
            Kind::Header,
            Kind::Cancel,
            Kind::Shutdown,
            Kind::Closed,
            Kind::Readable0,
            Kind::Readable1,
            Kind::Writable0,
            Kind::Writable1,
        ] {
            assert_eq!(untoken(token(123_456, kind)), Some((123_456, kind)));
        }
    }
}
