//! A flow's own socket to its backend: opening it (a non-blocking UDP
//! socket `connect`ed to the backend, so the kernel delivers only the
//! backend's replies and ICMP errors to it), sending one datagram on it
//! behind the flow's PROXY header, and reading its errors: which mean the
//! path to the backend failed, and which of those blame the backend. The
//! worker ([`super::worker`]) owns the sockets and decides what a failure
//! does to the flow.

#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The path to the backend failed: an ICMP error reported on the flow's
/// socket, or a route that went away. The flow moves or ends.
pub(super) fn path_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN)
    )
}

/// Of those, the one that can only come from the backend's host: an ICMP
/// port unreachable (nothing listens there). It counts against the backend
/// as a failed connect. Host and network unreachable also come from a
/// route that went away on this host, so they move the flow without
/// blaming anyone; active checks and discovery judge the backend's host.
pub(super) fn backend_refused(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECONNREFUSED)
}

/// A non-blocking UDP socket connected to `backend`.
pub(super) fn connected_socket(backend: SocketAddr) -> io::Result<OwnedFd> {
    let family = if backend.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2), checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = socket2::SockAddr::from(backend);
    // SAFETY: connect(2) with a valid address of its stated length.
    if unsafe { libc::connect(fd.as_raw_fd(), addr.as_ptr().cast(), addr.len()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sends `header` and `data` as one datagram on a connected socket.
pub(super) fn send(fd: RawFd, header: &[u8], data: &[u8]) -> io::Result<()> {
    let n = if header.is_empty() {
        // SAFETY: send(2) from a live slice.
        unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) }
    } else {
        let mut iov = [
            libc::iovec {
                iov_base: header.as_ptr().cast_mut().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: data.as_ptr().cast_mut().cast(),
                iov_len: data.len(),
            },
        ];
        // SAFETY: a msghdr over two live slices (the kernel only reads them).
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = 2;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT)
        }
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
