//! Fixed batches of datagrams for `recvmmsg(2)` and `sendmmsg(2)`: made
//! once per worker, never grown, so nothing is allocated per datagram.
//!
//! A [`Batch`] is [`BATCH`] slots of [`SLOT`] bytes, each with room for an
//! address and one control message (the `IP_PKTINFO`/`IPV6_PKTINFO` of a
//! wildcard listener: which of the host's addresses a datagram came to, and
//! so which one the reply must come from). The pointers the kernel reads
//! (`mmsghdr` → `iovec` → slot) point into boxed slices that never move.

#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per system call.
pub(super) const BATCH: usize = 32;

/// Bytes per slot: the largest UDP payload (65,507 over IPv4, 65,527 over
/// IPv6 without jumbograms) fits, so nothing is ever truncated.
pub(super) const SLOT: usize = 65_536;

/// Room for the control messages of one datagram: on a dual-stack socket
/// an IPv4 datagram brings both an `in6_pktinfo` (40 bytes with its
/// header) and an `in_pktinfo` (32); in 8-byte words so the buffer is
/// aligned for a `cmsghdr`.
const CONTROL_WORDS: usize = 16;

pub(super) struct Batch {
    data: Box<[u8]>,
    names: Box<[libc::sockaddr_storage]>,
    controls: Box<[[u64; CONTROL_WORDS]]>,
    iovs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
    /// Per slot: bytes in it.
    lens: [usize; BATCH],
    /// Per slot (receiving): the length of the address the kernel wrote.
    name_lens: [libc::socklen_t; BATCH],
    /// Per slot (sending): the source address the reply must leave from,
    /// for wildcard listeners.
    sources: [Option<IpAddr>; BATCH],
    /// Slots filled.
    len: usize,
}

impl Batch {
    pub(super) fn new() -> Batch {
        // SAFETY: all-zero is a valid sockaddr_storage, iovec and mmsghdr
        // (null pointers, zero lengths), filled in before each call.
        let zeroed_names = (0..BATCH).map(|_| unsafe { mem::zeroed::<libc::sockaddr_storage>() });
        let zeroed_iovs = (0..BATCH).map(|_| unsafe { mem::zeroed::<libc::iovec>() });
        let zeroed_headers = (0..BATCH).map(|_| unsafe { mem::zeroed::<libc::mmsghdr>() });
        Batch {
            data: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            names: zeroed_names.collect(),
            controls: vec![[0u64; CONTROL_WORDS]; BATCH].into_boxed_slice(),
            iovs: zeroed_iovs.collect(),
            headers: zeroed_headers.collect(),
            lens: [0; BATCH],
            name_lens: [0; BATCH],
            sources: [None; BATCH],
            len: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn clear(&mut self) {
        self.len = 0;
    }

    /// The bytes of slot `i`.
    pub(super) fn data(&self, i: usize) -> &[u8] {
        &self.data[i * SLOT..i * SLOT + self.lens[i]]
    }

    /// Where the datagram of slot `i` came from (receiving), or goes to
    /// (sending).
    pub(super) fn addr(&self, i: usize) -> Option<SocketAddr> {
        (self.name_lens[i] > 0).then(|| from_storage(&self.names[i]))?
    }

    /// Points slot `i`'s header at its buffer, name and control space.
    fn prepare(&mut self, i: usize, len: usize, with_name: bool, control_len: usize) {
        self.iovs[i] = libc::iovec {
            iov_base: self.data[i * SLOT..].as_mut_ptr().cast(),
            iov_len: len,
        };
        let h = &mut self.headers[i].msg_hdr;
        if with_name {
            h.msg_name = std::ptr::addr_of_mut!(self.names[i]).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        } else {
            h.msg_name = std::ptr::null_mut();
            h.msg_namelen = 0;
        }
        h.msg_iov = std::ptr::addr_of_mut!(self.iovs[i]);
        h.msg_iovlen = 1;
        if control_len > 0 {
            h.msg_control = self.controls[i].as_mut_ptr().cast();
            h.msg_controllen = control_len;
        } else {
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
        }
        h.msg_flags = 0;
        self.headers[i].msg_len = 0;
    }

    /// Receives up to a whole batch from a listening socket, with each
    /// datagram's source address (and, with `pktinfo`, the control message
    /// naming its destination). Replaces what the batch held.
    pub(super) fn recv_from(&mut self, fd: RawFd, pktinfo: bool) -> io::Result<usize> {
        let control = if pktinfo { CONTROL_WORDS * 8 } else { 0 };
        for i in 0..BATCH {
            self.prepare(i, SLOT, true, control);
        }
        self.len = 0;
        let n = recvmmsg(fd, &mut self.headers[..BATCH])?;
        for i in 0..n {
            self.lens[i] = self.headers[i].msg_len as usize;
            self.name_lens[i] = self.headers[i].msg_hdr.msg_namelen;
        }
        self.len = n;
        Ok(n)
    }

    /// The address a datagram of slot `i` was sent to, from its
    /// `IP_PKTINFO`/`IPV6_PKTINFO` control message (received with
    /// `pktinfo`).
    pub(super) fn destination(&self, i: usize) -> Option<IpAddr> {
        let h = &self.headers[i].msg_hdr;
        if h.msg_control.is_null() || h.msg_controllen == 0 {
            return None;
        }
        // SAFETY: the kernel wrote msg_controllen bytes of control messages
        // into this slot's buffer; the CMSG_* walk stays inside them, and a
        // message is read only if its length covers what is read.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len;
                let fits = |size: usize| len >= libc::CMSG_LEN(size as u32) as usize;
                match ((*c).cmsg_level, (*c).cmsg_type) {
                    (libc::IPPROTO_IP, libc::IP_PKTINFO) if fits(mem::size_of::<libc::in_pktinfo>()) => {
                        let info: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                        // The local address a reply must come from (the
                        // destination, for unicast).
                        return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr))));
                    }
                    (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if fits(mem::size_of::<libc::in6_pktinfo>()) => {
                        let info: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                        return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                    }
                    _ => {}
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        None
    }

    /// Free slots at the end.
    pub(super) fn room(&self) -> usize {
        BATCH - self.len
    }

    /// Receives up to `max` datagrams from a connected socket into the free
    /// slots; each is then addressed with [`Batch::address_last`].
    /// Returns how many arrived.
    pub(super) fn recv_connected(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let start = self.len;
        let max = max.min(self.room());
        if max == 0 {
            return Ok(0);
        }
        for i in start..start + max {
            self.prepare(i, SLOT, false, 0);
        }
        let n = recvmmsg(fd, &mut self.headers[start..start + max])?;
        for i in start..start + n {
            self.lens[i] = self.headers[i].msg_len as usize;
            self.sources[i] = None;
        }
        self.len = start + n;
        Ok(n)
    }

    /// Addresses the last `n` slots to `to`, from `source` (wildcard
    /// listeners; `None`: the socket's own address).
    pub(super) fn address_last(&mut self, n: usize, to: SocketAddr, source: Option<IpAddr>) {
        for i in self.len - n..self.len {
            self.names[i] = to_storage(to);
            self.sources[i] = source;
        }
    }

    /// Bytes in the last `n` slots.
    pub(super) fn bytes_of_last(&self, n: usize) -> u64 {
        (self.len - n..self.len).map(|i| self.lens[i] as u64).sum()
    }

    /// Sends every slot from `fd` (`sendmmsg`), each to its address, and
    /// empties the batch. Returns how many datagrams and bytes the kernel
    /// took, and the last error: a datagram the kernel refuses is dropped
    /// and the rest still go (UDP promises nothing, and a batch is never
    /// held back for one unreachable client); a full send queue (EAGAIN,
    /// ENOBUFS) drops the rest at once.
    pub(super) fn send_all(&mut self, fd: RawFd, v6: bool) -> (usize, u64, Option<io::Error>) {
        let n = self.len;
        for i in 0..n {
            let len = self.lens[i];
            let control = match self.sources[i] {
                Some(source) => self.write_pktinfo(i, source, v6),
                None => 0,
            };
            // `prepare` resets the name length: set it after.
            self.prepare(i, len, true, control);
            self.headers[i].msg_hdr.msg_namelen = name_len(&self.names[i]);
        }
        let mut done = 0;
        let mut sent = 0;
        let mut bytes = 0u64;
        let mut error = None;
        while done < n {
            match sendmmsg(fd, &mut self.headers[done..n]) {
                Ok(0) => break,
                Ok(k) => {
                    bytes += self.lens[done..done + k].iter().map(|&l| l as u64).sum::<u64>();
                    sent += k;
                    done += k;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let full = e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS);
                    error = Some(e);
                    if full {
                        break;
                    }
                    // The first message of the rest failed: skip it, send
                    // the others.
                    done += 1;
                }
            }
        }
        self.len = 0;
        (sent, bytes, error)
    }

    /// Writes the control message that makes slot `i` leave from `source`;
    /// returns its length.
    fn write_pktinfo(&mut self, i: usize, source: IpAddr, v6: bool) -> usize {
        let space = CONTROL_WORDS * 8;
        let control = &mut self.controls[i];
        *control = [0; CONTROL_WORDS];
        // SAFETY: a msghdr over this slot's aligned control buffer, and the
        // CMSG_* macros writing one message that fits in it (checked against
        // CMSG_SPACE).
        unsafe {
            let mut h: libc::msghdr = mem::zeroed();
            h.msg_control = control.as_mut_ptr().cast();
            h.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&h);
            match (source, v6) {
                (IpAddr::V4(ip), false) => {
                    let len = libc::CMSG_SPACE(mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                    debug_assert!(len <= space);
                    (*c).cmsg_level = libc::IPPROTO_IP;
                    (*c).cmsg_type = libc::IP_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(ip).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                    len
                }
                (ip, _) => {
                    let ip = match ip {
                        IpAddr::V6(ip) => ip,
                        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                    };
                    let len = libc::CMSG_SPACE(mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                    debug_assert!(len <= space);
                    (*c).cmsg_level = libc::IPPROTO_IPV6;
                    (*c).cmsg_type = libc::IPV6_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr { s6_addr: ip.octets() },
                        ipi6_ifindex: 0,
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
                    len
                }
            }
        }
    }
}

fn recvmmsg(fd: RawFd, headers: &mut [libc::mmsghdr]) -> io::Result<usize> {
    loop {
        // SAFETY: every header points at live buffers of this batch.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                headers.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn sendmmsg(fd: RawFd, headers: &mut [libc::mmsghdr]) -> io::Result<usize> {
    // SAFETY: every header points at live buffers of this batch.
    let n = unsafe {
        libc::sendmmsg(
            fd,
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        Ok(n as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(super) fn to_storage(addr: SocketAddr) -> libc::sockaddr_storage {
    let s = socket2::SockAddr::from(addr);
    // SAFETY: SockAddr's storage is a sockaddr_storage.
    unsafe { *s.as_ptr().cast::<libc::sockaddr_storage>() }
}

fn name_len(s: &libc::sockaddr_storage) -> libc::socklen_t {
    match i32::from(s.ss_family) {
        libc::AF_INET => mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        _ => mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
    }
}

pub(super) fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let a: libc::sockaddr_in = unsafe { *std::ptr::addr_of!(*s).cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe { *std::ptr::addr_of!(*s).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
