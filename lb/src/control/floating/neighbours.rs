//! The sockets that speak ARP and neighbour discovery for the floating
//! address: [`Announcer`] sends announcements and probes out of the
//! interface, [`Listener`] reads what other hosts say about the address.
//! The frames themselves are built and parsed in [`super::frames`]. Part of
//! [`super`], the floating address, whose module docs say how the election
//! uses them.

use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::frames::{
    arp_probe, dad_solicitation, garp, heard_arp, heard_nd, ipv6_packet, multicast_mac, solicitation, solicited_node,
    unsolicited_na, ArpOp,
};
use super::{link_address, Error, Heard, GARP_REPEATS};

const ETH_P_IPV6: u16 = 0x86dd;

/// A raw ICMPv6 socket that reads neighbour discovery on `interface`.
pub(super) fn open_icmpv6(interface: &str) -> Result<Socket, Error> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(|source| {
        if source.raw_os_error() == Some(libc::EPERM) {
            Error::MissingCapability {
                needs: "CAP_NET_RAW to send neighbour advertisements",
            }
        } else {
            Error::Socket { what: "ICMPv6", source }
        }
    })?;
    socket
        .bind_device(Some(interface.as_bytes()))
        .map_err(|source| Error::Socket { what: "ICMPv6", source })?;
    Ok(socket)
}

/// A socket reading what other hosts say about the floating address
/// ([`FloatingIp::listen`](super::FloatingIp::listen)).
#[derive(Debug)]
pub struct Listener {
    pub(super) socket: Socket,
    pub(super) address: IpAddr,
    pub(super) mac: [u8; 6],
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Listener {
    /// Reads one frame: what it says about the address, `None` if nothing
    /// (another address, our own frame, noise). Blocks unless
    /// [`set_nonblocking`](Listener::set_nonblocking); then `WouldBlock`
    /// when nothing is queued.
    pub fn recv(&self) -> io::Result<Option<Heard>> {
        let mut buf = [0u8; 1500];
        let n = io::Read::read(&mut &self.socket, &mut buf)?;
        let frame = &buf[..n];
        Ok(match self.address {
            IpAddr::V4(address) => heard_arp(frame, address, self.mac),
            IpAddr::V6(address) => heard_nd(frame, address, self.mac),
        })
    }

    /// For an event loop.
    pub fn set_nonblocking(&self) -> io::Result<()> {
        self.socket.set_nonblocking(true)
    }

    pub(super) fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.socket.set_read_timeout(Some(timeout))
    }
}

/// A packet socket that sends ARP or neighbour-discovery frames out of one
/// interface, for one address; for IPv6 also a raw ICMPv6 socket, whose
/// solicitations the kernel sends from our link-local address.
#[derive(Debug)]
pub(super) struct Announcer {
    socket: Socket,
    icmp: Option<Socket>,
    index: u32,
    pub(super) mac: [u8; 6],
    address: IpAddr,
}

impl Announcer {
    pub(super) fn open(index: u32, interface: &str, mac: [u8; 6], address: IpAddr) -> Result<Announcer, Error> {
        // Protocol 0: a send-only socket. With ETH_P_ARP the kernel would
        // queue every ARP frame on the link to it, for nobody to read.
        let socket = Socket::new(Domain::PACKET, Type::DGRAM, None).map_err(|source| {
            if source.raw_os_error() == Some(libc::EPERM) {
                Error::MissingCapability {
                    needs: if address.is_ipv4() {
                        "CAP_NET_RAW to send gratuitous ARP"
                    } else {
                        "CAP_NET_RAW to send neighbour advertisements"
                    },
                }
            } else {
                Error::Socket { what: "packet", source }
            }
        })?;
        let icmp = match address {
            IpAddr::V4(_) => None,
            IpAddr::V6(_) => {
                let icmp = open_icmpv6(interface)?;
                // Neighbour discovery requires hop limit 255 (RFC 4861 §7.1).
                let configured = icmp
                    .set_multicast_hops_v6(255)
                    .and_then(|()| icmp.set_multicast_if_v6(index));
                configured.map_err(|source| Error::Socket { what: "ICMPv6", source })?;
                Some(icmp)
            }
        };
        Ok(Announcer {
            socket,
            icmp,
            index,
            mac,
            address,
        })
    }

    fn send(&self, protocol: u16, destination: [u8; 6], frame: &[u8]) -> io::Result<()> {
        self.socket
            .send_to(frame, &link_address(self.index, protocol, destination)?)
            .map(drop)
    }

    /// IPv4: both kinds, as keepalived and arping -U/-A: some hosts only
    /// heed requests, some only replies. Linux updates an existing entry
    /// from either, even within its `locktime`, because they are gratuitous
    /// (sender IP = target IP). IPv6: advertisements with the override flag,
    /// which make Linux (and RFC 4861 §7.2.5) replace the cached MAC.
    pub(super) fn announce(&self) -> io::Result<()> {
        match self.address {
            IpAddr::V4(address) => {
                let request = garp(ArpOp::Request, self.mac, address);
                let reply = garp(ArpOp::Reply, self.mac, address);
                for _ in 0..GARP_REPEATS {
                    self.send(libc::ETH_P_ARP as u16, [0xff; 6], &request)?;
                    self.send(libc::ETH_P_ARP as u16, [0xff; 6], &reply)?;
                }
                tracing::debug!(%address, frames = 2 * GARP_REPEATS, "gratuitous ARP sent");
            }
            IpAddr::V6(address) => {
                let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
                let packet = ipv6_packet(address, all_nodes, &unsolicited_na(self.mac, address));
                for _ in 0..GARP_REPEATS {
                    self.send(ETH_P_IPV6, multicast_mac(all_nodes), &packet)?;
                }
                tracing::debug!(%address, frames = GARP_REPEATS, "unsolicited neighbour advertisements sent");
            }
        }
        Ok(())
    }

    /// `dad`: a probe before a claim (for IPv6 from the unspecified
    /// address); otherwise, for IPv6, a solicitation from our link-local
    /// address, which holders answer to us alone.
    pub(super) fn probe(&self, dad: bool) -> io::Result<()> {
        match self.address {
            IpAddr::V4(address) => self.send(libc::ETH_P_ARP as u16, [0xff; 6], &arp_probe(self.mac, address)),
            IpAddr::V6(address) => {
                let group = solicited_node(address);
                if dad {
                    let packet = ipv6_packet(Ipv6Addr::UNSPECIFIED, group, &dad_solicitation(address));
                    return self.send(ETH_P_IPV6, multicast_mac(group), &packet);
                }
                let icmp = self.icmp.as_ref().expect("IPv6 announcers have an ICMPv6 socket");
                let to = std::net::SocketAddrV6::new(group, 0, 0, self.index);
                // The kernel fills in the source and the checksum.
                icmp.send_to(&solicitation(self.mac, address), &SockAddr::from(to))
                    .map(drop)
            }
        }
    }
}
