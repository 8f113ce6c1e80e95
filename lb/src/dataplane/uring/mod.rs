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
//!   descriptors ([`pressure`](super::pressure)) and a backend socket is ready (the same
//!   "spare" rule as the epoll path: under a descriptor shortage clients
//!   wait in the backlog, not in a process that cannot reach a backend).
//!   Every accepted client is checked against the HA lease ([`lease`](super::lease)).
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
//!   way; the connection ends when both ways have. When a read leaves more
//!   in the socket (bytes, or a FIN the kernel counts as one), its send
//!   carries `MSG_MORE`, so the last bytes and our FIN leave in one
//!   segment. Closes go through the ring; the shutdown is a direct call
//!   (io_uring runs shutdowns on its blocking worker threads: a thread
//!   wake-up each, measured).
//! - **Idle timeout**: a deadline per connection in the worker's timer
//!   heap, checked against its last activity.
//! - **Splice**: with `copy = "splice"` a direction whose read fills a
//!   buffer moves on to splice(2) through a pipe from the worker's pool
//!   (the epoll data plane's `splice-auto` rule). io_uring's own splice
//!   runs on blocking kernel threads, one per operation in flight, so here
//!   the ring only waits for readiness (a poll) and the worker splices
//!   with direct non-blocking calls.
//!
//! # Failover: nothing served past a step-down
//! This data plane keeps the epoll one's two guards. The control plane
//! takes a VIP's socket out of LISTEN with `shutdown(2)` from its own
//! thread (the control plane's `Listening::close`), which no worker can
//! delay: from then on no client reaches this process, whatever a worker
//! is doing; the pending accept completes with an error and the worker
//! drops its clone (a tick cancels it if it did not). And every accepted
//! client is checked against the lease deadline ([`lease::valid`](super::lease::valid)) before
//! anything is sent to a backend, so a worker that was frozen past the
//! lease closes the clients the kernel queued for it instead of serving
//! them.
//!
//! # Safety of the ring
//! Every buffer or address an operation points at lives in a `Box` owned by
//! the connection or listener, which is freed only when no operation of it
//! is in flight (`inflight` counts them), or in the buffer pool, which lives
//! as long as the ring.
//!
//! # Layout
//! - this file: the worker thread, its loop, timers and the control
//!   plane's commands;
//! - `pool`: the provided-buffer ring;
//! - `accept`: listeners and accepting;
//! - `conn`: a connection from connect to close.
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

mod accept;
mod conn;
mod pool;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::accept::Listener;
use self::conn::Conn;
use self::pool::Pool;
use crate::balance::table::Vip;
use crate::dataplane::mailbox::{self, Mailbox};
use crate::dataplane::pressure::RateLimit;
use crate::dataplane::slab::Slab;
use crate::dataplane::workers;

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
pub(crate) type Handle = Mailbox<Command>;

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
    let (handle, inbox) = mailbox::new("io_uring", 0)?;
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new().name(name).spawn(move || {
        workers::set_worker(index);
        match Worker::new(inbox.commands, inbox.wake) {
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
    Ok(handle)
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
    /// The close of a freed connection's socket.
    Closed = 11,
    /// Splice mode: the client (direction 0) or backend (1) is readable.
    Readable0 = 12,
    Readable1 = 13,
    /// Splice mode: the backend (direction 0) or client (1) is writable.
    Writable0 = 14,
    Writable1 = 15,
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
        11 => Kind::Closed,
        12 => Kind::Readable0,
        13 => Kind::Readable1,
        14 => Kind::Writable0,
        15 => Kind::Writable1,
        _ => return None,
    };
    Some((index, kind))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Tick,
    Listener(usize, u64),
    Relief(usize, u64),
    Idle(usize, u64),
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
                    yielding: None,
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
        let live = self.conns.capacity() + self.listeners.capacity();
        if self.timers.len() > 2 * live + 64 {
            let (conns, listeners) = (&self.conns, &self.listeners);
            self.timers.retain(|Reverse((_, timer))| match *timer {
                Timer::Tick => true,
                Timer::Listener(i, serial) => listeners.peek(i).is_some_and(|l| l.serial == serial),
                Timer::Relief(i, serial) | Timer::Idle(i, serial) => conns.peek(i).is_some_and(|c| c.serial == serial),
            });
        }
        for index in 0..self.listeners.capacity() {
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
