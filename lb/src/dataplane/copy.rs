//! Moving bytes between a client and its backend, both ways, with half-close
//! and an idle timeout.
//!
//! Two strategies, chosen per VIP (`copy = "buffered" | "splice"`):
//! - **buffered**: read into a per-thread 16 KiB buffer and write straight
//!   out. No buffer lives in an idle connection: memory is only held for
//!   bytes a slow peer has not taken yet.
//! - **splice**: zero-copy through a kernel pipe with `splice(2)`; the bytes
//!   never enter user space. Each direction starts buffered and splices from
//!   its first read that fills the buffer, so small messages cost no pipe
//!   round trip. Pipes come from a per-thread pool and are held only while
//!   bytes are in flight, so idle connections cost no pipes.
//!
//! Half-close: when one side sends FIN, we shut down writing towards the
//! other and keep copying the other direction until it ends too.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use metrics::Counter;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::settings::CopyMode;

/// Bytes a single buffered read moves at most. 16 KiB, as HAProxy's
/// buffers: the bytes are still in the CPU's cache when the write copies
/// them out again. 64 KiB cost 1.2-2× HAProxy's CPU per GB on bulk
/// transfers here; 16 KiB costs 1.0-1.12×.
const CHUNK: usize = 16 * 1024;

thread_local! {
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Both directions reached end of stream.
    Closed,
    /// No bytes moved either way for the idle timeout.
    IdleTimeout,
}

/// Counters a transfer feeds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meters<'a> {
    /// Client → backend bytes.
    pub bytes_in: &'a Counter,
    /// Backend → client bytes.
    pub bytes_out: &'a Counter,
}

/// Copies both ways until both directions end, an error, or `idle` passes
/// with no bytes moved.
pub(crate) async fn proxy(
    client: &TcpStream,
    backend: &TcpStream,
    mode: CopyMode,
    idle: Duration,
    meters: Meters<'_>,
) -> io::Result<Ended> {
    let start = Instant::now();
    // Milliseconds after `start` of the last byte moved, either way.
    let last = AtomicU64::new(0);
    let one_ended = AtomicBool::new(false);
    let activity = Activity {
        start,
        last: &last,
        one_ended: &one_ended,
    };
    let both = async {
        match mode {
            CopyMode::Buffered => {
                tokio::try_join!(
                    pump_buffered(client, backend, meters.bytes_in, activity),
                    pump_buffered(backend, client, meters.bytes_out, activity)
                )
            }
            CopyMode::Splice => {
                tokio::try_join!(
                    pump_splice(client, backend, meters.bytes_in, activity),
                    pump_splice(backend, client, meters.bytes_out, activity)
                )
            }
        }
    };
    let idle_watch = async {
        loop {
            let deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        result = both => result.map(|_| Ended::Closed),
        () = idle_watch => Ok(Ended::IdleTimeout),
    }
}

#[derive(Clone, Copy)]
struct Activity<'a> {
    start: Instant,
    last: &'a AtomicU64,
    /// One direction has reached end of stream.
    one_ended: &'a AtomicBool,
}

impl Activity<'_> {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// `src` reached end of stream: pass the FIN on to `dst`. When the other
    /// direction has already ended, both sockets are closed the moment this
    /// returns, and the close sends that FIN (everything was read, so it is
    /// a FIN, not a reset): one `shutdown(2)` fewer per connection.
    fn end_of_stream(&self, dst: &TcpStream) {
        if !self.one_ended.swap(true, Ordering::Relaxed) {
            half_close(dst);
        }
    }
}

/// Ends the write side towards `dst` (our FIN), keeping its read side open.
fn half_close(dst: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        // The peer may already be gone; the other direction will notice.
        tracing::debug!(error = %e, "shutdown(SHUT_WR) failed");
    }
}

enum Step {
    Eof,
    Moved(usize),
    /// Moved the last bytes before the peer's FIN.
    MovedLast(usize),
    WouldBlock,
}

/// What one [`buffered_step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moved {
    /// Bytes passed on (0 when the readiness was stale).
    Bytes(usize),
    /// The last bytes before `src`'s FIN were passed on; `dst`'s FIN is
    /// due now and rides on the same segment.
    Last(usize),
    /// `src` reached end of stream.
    Eof,
}

/// Adds one step's bytes to `total`. At the end of `src` (a FIN read, or
/// the last bytes before it) passes the FIN on to `dst` and breaks with the
/// direction's total; otherwise continues with the bytes just moved.
fn tally(step: Moved, total: &mut u64, dst: &TcpStream, activity: Activity<'_>) -> ControlFlow<u64, usize> {
    match step {
        Moved::Bytes(n) => {
            *total += n as u64;
            ControlFlow::Continue(n)
        }
        Moved::Last(n) => {
            *total += n as u64;
            activity.end_of_stream(dst);
            ControlFlow::Break(*total)
        }
        Moved::Eof => {
            activity.end_of_stream(dst);
            ControlFlow::Break(*total)
        }
    }
}

async fn pump_buffered(src: &TcpStream, dst: &TcpStream, counter: &Counter, activity: Activity<'_>) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let step = buffered_step(src, dst, counter, activity).await?;
        if let ControlFlow::Break(total) = tally(step, &mut total, dst, activity) {
            return Ok(total);
        }
    }
}

/// Waits for `src` to be readable, reads once through the thread's buffer
/// and writes the bytes on to `dst`, waiting for `dst` if it cannot take
/// them all at once.
///
/// When the peer's FIN has already arrived (the reactor saw `EPOLLRDHUP`)
/// and a read empties the socket, those are the last bytes: they go out
/// with `MSG_MORE`, so the kernel holds them for the FIN that the caller
/// sends at once ([`Activity::end_of_stream`], or the close). Data and FIN
/// then leave in one segment, and the `recv(2)` that would only return 0
/// is never made: two packets (our FIN, the peer's ACK of the data) and one
/// syscall fewer per closing direction. HAProxy merges the FIN the same way.
async fn buffered_step(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &Counter,
    activity: Activity<'_>,
) -> io::Result<Moved> {
    src.readable().await?;
    // Judged before the read: a FIN seen now arrived before it, so a read
    // that does not fill the buffer has taken every byte the peer sent.
    let finished = peer_finished(src);
    // Bytes read but not yet taken by `dst`: empty (unallocated) unless the
    // peer is slower than the source.
    let mut pending: Vec<u8> = Vec::new();
    // The shared buffer is borrowed only inside this closure, never across
    // an await.
    let step = BUFFER.with_borrow_mut(|buf| -> io::Result<Step> {
        let n = match read_draining(src, buf) {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::WouldBlock),
            Err(e) => return Err(e),
        };
        let last = finished && n < buf.len();
        let mut off = 0;
        while off < n {
            let sent = if last {
                send_more(dst, &buf[off..n])
            } else {
                dst.try_write(&buf[off..n])
            };
            match sent {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pending.extend_from_slice(&buf[off..n]);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(if last { Step::MovedLast(n) } else { Step::Moved(n) })
    })?;
    let (n, last) = match step {
        Step::Eof => return Ok(Moved::Eof),
        Step::WouldBlock => return Ok(Moved::Bytes(0)),
        Step::Moved(n) => (n, false),
        Step::MovedLast(n) => (n, true),
    };
    counter.increment(n as u64);
    activity.touch();
    // Written without MSG_MORE: nothing stays held behind a slow peer.
    while !pending.is_empty() {
        dst.writable().await?;
        match dst.try_write(&pending) {
            Ok(m) => {
                pending.drain(..m);
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(if last { Moved::Last(n) } else { Moved::Bytes(n) })
}

/// Whether `src`'s peer has sent its FIN, as far as this thread's reactor
/// knows: tokio keeps the read-closed state (from `EPOLLRDHUP`) until the
/// socket goes, so one poll of its readiness tells, without a syscall.
fn peer_finished(src: &TcpStream) -> bool {
    use std::future::Future;
    let mut ready = std::pin::pin!(src.ready(Interest::READABLE));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(ready.as_mut().poll(&mut cx), std::task::Poll::Ready(Ok(r)) if r.is_read_closed())
}

/// `send(2)` with `MSG_MORE`: the kernel may hold the bytes for what comes
/// next, which must come at once (here: our FIN).
fn send_more(dst: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    dst.try_io(Interest::WRITABLE, || {
        socket2::SockRef::from(dst).send_with_flags(buf, libc::MSG_MORE | libc::MSG_NOSIGNAL)
    })
}

/// Reads what `src` has, up to `buf.len()`.
///
/// A read that returns less than the buffer has emptied the socket's
/// receive queue, so it also clears the socket's read readiness: the task
/// then waits for the kernel's next edge instead of paying a `recv(2)` that
/// can only say EAGAIN (HAProxy stops on a short read the same way). That
/// is one syscall fewer per read, two per proxied request.
///
/// Why nothing is missed: tokio clears readiness only if no readiness event
/// arrived since the one the task woke on (the event's tick), and a byte
/// that lands after our read raises a new edge (epoll is edge-triggered) on
/// the next turn of this thread's reactor, after the clear. A FIN is never
/// cleared: tokio keeps the read-closed state, so the next wait returns at
/// once and the next read sees the end of stream.
fn read_draining(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    let read = src.try_io(Interest::READABLE, || {
        got = nix::sys::socket::recv(src.as_raw_fd(), buf, nix::sys::socket::MsgFlags::empty())?;
        if got > 0 && got < buf.len() {
            // Drained: WouldBlock makes try_io clear the readiness; the
            // bytes are returned below all the same.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match read {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// A kernel pipe for splice(2): (read end, write end), counted in its
/// [`PipeBudget`] until closed.
#[derive(Debug)]
pub(crate) struct Pipe(pub(crate) OwnedFd, pub(crate) OwnedFd, &'static PipeBudget);

impl Drop for Pipe {
    fn drop(&mut self) {
        self.2.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many pipes the process may hold open (in use or pooled), as
/// HAProxy's `maxpipes`: each costs two descriptors, and descriptors are
/// what clients need. Past it, splicing directions copy through the buffer
/// until a pipe closes.
#[derive(Debug)]
pub(crate) struct PipeBudget {
    open: AtomicUsize,
    limit: usize,
}

impl PipeBudget {
    const fn new(limit: usize) -> PipeBudget {
        PipeBudget {
            open: AtomicUsize::new(0),
            limit,
        }
    }

    /// A new pipe, if the budget allows one.
    fn open(&'static self) -> io::Result<Pipe> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.limit {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::other(format!(
                "{} splice pipes open, the most allowed (a quarter of RLIMIT_NOFILE)",
                self.limit
            )));
        }
        match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok((read, write)) => {
                // A bigger pipe moves more per syscall; best effort.
                if let Err(e) = nix::fcntl::fcntl(write.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20)) {
                    tracing::trace!(error = %e, "F_SETPIPE_SZ refused; keeping the default pipe size");
                }
                Ok(Pipe(read, write, self))
            }
            Err(e) => {
                self.open.fetch_sub(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }
}

/// The process's pipe budget: pipes may take at most a quarter of the
/// descriptors RLIMIT_NOFILE allows at start (each pipe is two).
static PIPE_BUDGET: LazyLock<PipeBudget> = LazyLock::new(|| {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX));
    PipeBudget::new(nofile / 8)
});

/// Empty pipes kept per thread for reuse; beyond this they are closed.
const PIPE_POOL_MAX: usize = 64;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Makes [`take_pipe`] fail on this thread, as it does out of descriptors.
    static REFUSE_PIPES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// An empty pipe from this thread's pool, or a new one within the
/// process's [`PipeBudget`]. A connection holds a pipe only while bytes are
/// in flight, so idle connections cost no pipe descriptors (HAProxy pools
/// its splice pipes the same way).
pub(crate) fn take_pipe() -> io::Result<Pipe> {
    #[cfg(test)]
    if REFUSE_PIPES.get() {
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    if let Some(pipe) = PIPES.with_borrow_mut(Vec::pop) {
        return Ok(pipe);
    }
    LazyLock::force(&PIPE_BUDGET).open()
}

/// Returns an empty pipe to the pool (or closes it if the pool is full).
pub(crate) fn return_pipe(pipe: Pipe) {
    PIPES.with_borrow_mut(|pool| {
        if pool.len() < PIPE_POOL_MAX {
            pool.push(pipe);
        }
    });
}

/// Splice mode. A direction starts out buffered, and splices once a read
/// fills the thread's buffer: small messages (a request, a response) cost
/// one `recv` and one `send`, where splicing them costs two `splice` calls
/// into and out of a pipe (1.2× HAProxy's CPU per keep-alive request), and
/// bulk transfers still move through the pipe without a copy to user
/// space (HAProxy's `splice-auto` decides alike).
async fn pump_splice(src: &TcpStream, dst: &TcpStream, counter: &Counter, activity: Activity<'_>) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let step = buffered_step(src, dst, counter, activity).await?;
        match tally(step, &mut total, dst, activity) {
            ControlFlow::Break(total) => return Ok(total),
            ControlFlow::Continue(n) if n == CHUNK => break,
            ControlFlow::Continue(_) => {}
        }
    }
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        src.readable().await?;
        let pipe = match take_pipe() {
            Ok(pipe) => pipe,
            Err(e) => {
                // No pipe (out of descriptors, or pipes refused): this read
                // goes through the buffer instead, and the connection lives
                // on; a later read tries for a pipe again.
                tracing::debug!(error = %e, "no pipe for splice; copying through the buffer");
                let step = buffered_step(src, dst, counter, activity).await?;
                if let ControlFlow::Break(total) = tally(step, &mut total, dst, activity) {
                    return Ok(total);
                }
                continue;
            }
        };
        let moved = src.try_io(Interest::READABLE, || {
            splice(src.as_fd(), None, pipe.1.as_fd(), None, 1 << 20, flags).map_err(io::Error::from)
        });
        let mut in_pipe = match moved {
            Ok(0) => {
                return_pipe(pipe);
                activity.end_of_stream(dst);
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return_pipe(pipe);
                continue;
            }
            Err(e) => {
                return_pipe(pipe);
                return Err(e);
            }
        };
        total += in_pipe as u64;
        counter.increment(in_pipe as u64);
        activity.touch();
        // On an error here the pipe still holds bytes: it is dropped
        // (closed), never pooled.
        while in_pipe > 0 {
            let out = dst.try_io(Interest::WRITABLE, || {
                splice(pipe.0.as_fd(), None, dst.as_fd(), None, in_pipe, flags).map_err(io::Error::from)
            });
            match out {
                Ok(m) => {
                    in_pipe -= m;
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
        return_pipe(pipe);
    }
}

#[cfg(test)]
mod tests {
    use metrics::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, connected) = tokio::join!(listener.accept(), connect);
        (accepted.unwrap().0, connected.unwrap())
    }

    /// Runs `proxy` between two pairs, sends `len` bytes one way then FIN,
    /// and returns what arrived at the far end.
    async fn through(mode: CopyMode, len: usize) -> Vec<u8> {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut backend) = pair().await;
        let counter = Counter::noop();
        let meters = Meters {
            bytes_in: &counter,
            bytes_out: &counter,
        };
        let relay = proxy(&proxy_client, &proxy_backend, mode, Duration::from_secs(10), meters);
        let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let send = async {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
        };
        let receive = async {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            // Our FIN back: the relay's other direction ends too.
            backend.shutdown().await.unwrap();
            got
        };
        let (ended, (), got) = tokio::join!(relay, send, receive);
        assert_eq!(ended.unwrap(), Ended::Closed);
        assert_eq!(got, sent, "{mode:?}: the bytes arrive whole and in order");
        got
    }

    #[tokio::test]
    async fn splice_mode_carries_small_messages_buffered_and_bulk_through_pipes() {
        PIPES.with_borrow_mut(Vec::clear);
        // A small message never fills the buffer: no pipe is made.
        through(CopyMode::Splice, 100).await;
        assert_eq!(PIPES.with_borrow(Vec::len), 0, "no pipe for a small message");
        // Bulk fills it: the rest goes through a pipe, returned to the pool.
        through(CopyMode::Splice, 4 << 20).await;
        assert!(PIPES.with_borrow(Vec::len) > 0, "bulk went through a pipe");
        through(CopyMode::Buffered, 4 << 20).await;
    }

    #[tokio::test]
    async fn splice_mode_without_pipes_copies_through_the_buffer() {
        // Out of descriptors, no pipe can be made: bulk still arrives whole
        // (it used to end the connection with EMFILE).
        PIPES.with_borrow_mut(Vec::clear);
        REFUSE_PIPES.set(true);
        tokio::time::timeout(Duration::from_secs(30), through(CopyMode::Splice, 4 << 20))
            .await
            .expect("the transfer ends, with every byte");
        REFUSE_PIPES.set(false);
        assert_eq!(PIPES.with_borrow(Vec::len), 0, "no pipe was made");
    }

    #[test]
    fn pipes_beyond_the_budget_are_refused_until_one_closes() {
        static BUDGET: PipeBudget = PipeBudget::new(3);
        let mut pipes: Vec<Pipe> = (0..3).map(|_| BUDGET.open().unwrap()).collect();
        let refused = BUDGET.open().unwrap_err();
        assert!(refused.to_string().contains("3 splice pipes open"), "{refused}");
        drop(pipes.pop());
        let again = BUDGET.open().expect("a closed pipe frees its place");
        assert_eq!(BUDGET.open.load(Ordering::Relaxed), 3);
        drop(again);
        assert_eq!(BUDGET.open.load(Ordering::Relaxed), 2);
    }

    /// Waits (polling, bounded) until `stream`'s reactor has seen its
    /// peer's FIN, as the relay would after an epoll turn.
    async fn until_finished(stream: &TcpStream) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !peer_finished(stream) {
            assert!(Instant::now() < deadline, "the FIN never showed");
            tokio::task::yield_now().await;
            let _ = tokio::time::timeout(Duration::from_millis(10), stream.ready(Interest::READABLE)).await;
        }
    }

    #[tokio::test]
    async fn last_bytes_that_arrive_with_the_fin_are_passed_on_with_ours() {
        for mode in [CopyMode::Buffered, CopyMode::Splice] {
            for other_side_first in [false, true] {
                let (mut client, proxy_client) = pair().await;
                let (proxy_backend, mut backend) = pair().await;
                if other_side_first {
                    // The backend has finished already (its FIN waits in
                    // the relay's socket): the client's last bytes go out
                    // with the close, not a shutdown.
                    backend.shutdown().await.unwrap();
                    until_finished(&proxy_backend).await;
                }
                // Bytes and FIN are both in the relay's socket before it
                // first reads: the FIN path, not a read that returns 0.
                client.write_all(b"last words").await.unwrap();
                client.shutdown().await.unwrap();
                until_finished(&proxy_client).await;
                assert!(peer_finished(&proxy_client));
                let counter = Counter::noop();
                let meters = Meters {
                    bytes_in: &counter,
                    bytes_out: &counter,
                };
                let relay = async move {
                    let ended = proxy(&proxy_client, &proxy_backend, mode, Duration::from_secs(10), meters).await;
                    // Both ends done: the sockets close, as the
                    // connection's task drops them.
                    drop((proxy_client, proxy_backend));
                    ended
                };
                let receive = async {
                    let mut got = Vec::new();
                    backend.read_to_end(&mut got).await.unwrap();
                    if !other_side_first {
                        backend.shutdown().await.unwrap();
                    }
                    got
                };
                let client_sees_end = async {
                    let mut rest = Vec::new();
                    client.read_to_end(&mut rest).await.unwrap();
                    rest
                };
                let (ended, got, rest) = tokio::time::timeout(Duration::from_secs(10), async {
                    tokio::join!(relay, receive, client_sees_end)
                })
                .await
                .expect("nothing is held back waiting for more bytes");
                assert_eq!(ended.unwrap(), Ended::Closed, "{mode:?}");
                assert_eq!(got, b"last words", "{mode:?}, other side first: {other_side_first}");
                assert!(rest.is_empty());
            }
        }
    }
}
