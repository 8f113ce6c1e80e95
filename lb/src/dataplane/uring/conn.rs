//! One proxied connection on the ring: connect with retries, the PROXY
//! header, the copy both ways (buffers or splice), half-close, the idle
//! timeout and the end.

use std::cmp::Reverse;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types};
use nix::fcntl::SpliceFFlags;
use socket2::SockAddr;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::balance::backend::ActiveConnection;
use crate::balance::selection::PickContext;
use crate::balance::table::{ClientSlot, Table, Vip};
use crate::dataplane::copy::{self, Pipe};
use crate::dataplane::pressure::{self, Op};
use crate::dataplane::{proxy_protocol, workers};
use crate::settings::{CopyMode, ProxyProtocol, VipSettings};

use super::{token, Kind, Timer, Worker, CHUNK, GROUP, GROW_BY, RECHECK, SPLICE_ROUNDS};

/// One direction of a connection's copy.
#[derive(Debug, Default)]
pub(super) struct Direction {
    /// The buffer holding bytes not yet sent, and how many.
    pub(super) buffer: Option<(u16, u32)>,
    /// Bytes of it sent.
    pub(super) sent: u32,
    /// The read that filled it left more in the socket: more bytes, or the
    /// peer's FIN (the kernel reports a pending FIN as one byte more).
    pub(super) more: bool,
    /// End of stream read.
    pub(super) ended: bool,
    /// Splice mode, and a read has filled a buffer: this direction now
    /// moves its bytes through a pipe.
    pub(super) splicing: bool,
    /// The pipe holding bytes on their way, and how many.
    pub(super) pipe: Option<(Pipe, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Connecting,
    /// A connect failed; the next starts once its timeout has completed.
    Retrying,
    /// Out of local resources: waiting for relief before trying again.
    WaitingRelief,
    Header,
    Copying,
}

pub(super) struct Conn {
    pub(super) vip: Arc<Vip>,
    pub(super) serial: u64,
    pub(super) client: OwnedFd,
    /// The backend socket; a spare until connected.
    pub(super) backend: Option<OwnedFd>,
    pub(super) v4: bool,
    pub(super) peer: SocketAddr,
    pub(super) phase: Phase,
    pub(super) inflight: u32,
    /// Set on an error or timeout: no new operation, freed once the
    /// in-flight ones have completed.
    pub(super) aborting: bool,
    pub(super) settings: Arc<VipSettings>,
    /// The table of the first attempt, for every retry.
    pub(super) table: Option<Arc<Table>>,
    pub(super) tried: Vec<usize>,
    pub(super) attempt: u32,
    pub(super) picked: usize,
    pub(super) local_wait_ends: Option<Instant>,
    /// Where the in-flight connect goes, and its timeout.
    pub(super) addr: SockAddr,
    pub(super) timeout: types::Timespec,
    pub(super) header: Vec<u8>,
    pub(super) header_sent: usize,
    pub(super) dirs: [Direction; 2],
    pub(super) last_activity: Instant,
    pub(super) _active: Option<ActiveConnection>,
    pub(super) _slot: ClientSlot,
    pub(super) _load: workers::Load,
    pub(super) _tracked: TaskTrackerToken,
}

/// A non-blocking TCP socket of the family, with TCP_NODELAY (small
/// writes leave at once).
pub(super) fn tcp_socket(v4: bool) -> io::Result<OwnedFd> {
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

/// Counts `n` bytes of direction `dir` (0: client to backend) in the VIP's
/// metrics.
fn count_bytes(vip: &Vip, dir: usize, n: u64) {
    let counter = if dir == 0 {
        &vip.metrics().bytes_in
    } else {
        &vip.metrics().bytes_out
    };
    counter.increment(n);
}

impl Conn {
    /// `n` bytes came in for direction `dir`: counted, and activity.
    pub(super) fn moved(&mut self, dir: usize, n: u64, now: Instant) {
        self.last_activity = now;
        count_bytes(&self.vip, dir, n);
    }

    pub(super) fn fd(&self, side: usize) -> RawFd {
        if side == 0 {
            self.client.as_raw_fd()
        } else {
            self.backend.as_ref().map_or(-1, AsRawFd::as_raw_fd)
        }
    }
}

impl Worker {
    // ---- connect ----

    /// Picks a backend and connects to it, or ends the client when none is
    /// left to try.
    pub(super) fn connect(&mut self, index: usize) {
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
            by_port: false,
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

    pub(super) fn connected(&mut self, index: usize, result: i32) {
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
                    None => {
                        // The client's socket has no local address (it is
                        // already gone): nothing to proxy.
                        self.abort(index);
                        self.op_done(index);
                    }
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
    pub(super) fn connect_timeout_done(&mut self, index: usize) {
        let Some(c) = self.conns.get(index) else { return };
        c.inflight -= 1;
        if !c.aborting && c.phase == Phase::Retrying && c.inflight == 0 {
            return self.connect(index);
        }
        self.op_done(index);
    }

    /// Waits (a timer) for a connection to end somewhere, within
    /// [`pressure::CLIENT_WAIT`] of the first wait.
    pub(super) fn wait_for_relief(&mut self, index: usize, now: Instant) {
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

    pub(super) fn waited_for_relief(&mut self, index: usize) {
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

    pub(super) fn no_backend(&mut self, index: usize) {
        let Some(c) = self.conns.get(index) else { return };
        c.vip.metrics().no_backend.increment(1);
        tracing::warn!(vip = c.vip.name(), client = %c.peer, tried = c.tried.len(), "no backend reachable; closing client");
        self.finish(index);
    }

    // ---- PROXY header ----

    pub(super) fn send_header(&mut self, index: usize) {
        let Some(c) = self.conns.get(index) else { return };
        let rest = &c.header[c.header_sent..];
        let entry = opcode::Send::new(types::Fd(c.fd(1)), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token(index, Kind::Header));
        c.inflight += 1;
        self.push(&entry);
    }

    pub(super) fn header_sent(&mut self, index: usize, result: i32) {
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

    pub(super) fn start_copy(&mut self, index: usize) {
        let now = self.now;
        let Some(c) = self.conns.get(index) else { return };
        c.phase = Phase::Copying;
        c.last_activity = now;
        let (serial, idle) = (c.serial, c.settings.idle_timeout);
        self.timers.push(Reverse((now + idle, Timer::Idle(index, serial))));
        self.recv(index, 0);
        self.recv(index, 1);
    }

    pub(super) fn recv(&mut self, index: usize, dir: usize) {
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

    pub(super) fn received(&mut self, index: usize, dir: usize, result: i32, flags: u32) {
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
            c.moved(dir, result as u64, now);
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

    pub(super) fn send(&mut self, index: usize, dir: usize) {
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

    pub(super) fn sent(&mut self, index: usize, dir: usize, result: i32) {
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
    pub(super) fn splice_pump(&mut self, index: usize, dir: usize) {
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
                    count_bytes(&c.vip, dir, n as u64);
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
    pub(super) fn ready(&mut self, index: usize, dir: usize, result: i32) {
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
    pub(super) fn end_of_stream(&mut self, index: usize, dir: usize) {
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

    pub(super) fn give_back(&mut self, id: u16) {
        self.pool.put(id);
        // A direction waiting for a buffer may read again.
        while let Some((index, serial, dir)) = self.starved.pop_front() {
            if self.conns.get(index).is_some_and(|c| c.serial == serial && !c.aborting) {
                self.recv(index, dir);
                break;
            }
        }
    }

    pub(super) fn check_idle(&mut self, index: usize) {
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
    pub(super) fn abort(&mut self, index: usize) {
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
    pub(super) fn op_done(&mut self, index: usize) {
        let Some(c) = self.conns.get(index) else { return };
        if c.inflight > 0 {
            return;
        }
        let done = c.aborting || (c.phase == Phase::Copying && c.dirs[0].ended && c.dirs[1].ended);
        if done {
            self.finish(index);
        }
    }

    pub(super) fn finish(&mut self, index: usize) {
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
