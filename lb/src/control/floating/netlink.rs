//! The floating address's rtnetlink side: requests to the kernel
//! ([`Netlink`]: look up an interface, add or remove an address or a local
//! route; the ECMP mode's announce interface uses it too) and the kernel's
//! notifications of removed addresses ([`Removals`]), with which an active
//! notices its address taken from under it. Part of [`super`], the floating
//! address, whose module docs say how the election uses it.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use socket2::SockRef;

use super::{Error, READ_BURST};

/// Bounds every netlink receive; the kernel answers at once, so hitting it
/// means something is badly wrong, and the caller should hear about it rather
/// than hang.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn address_message(index: u32, address: IpAddr, prefix_len: u8) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.prefix_len = prefix_len;
    message.header.scope = AddressScope::Universe;
    message.header.index = index;
    match address {
        IpAddr::V4(v4) => {
            message.header.family = AddressFamily::Inet;
            // IPv4 wants both: LOCAL is the interface's own address, ADDRESS
            // the peer's on point-to-point links and the same otherwise (as
            // `ip addr add`).
            message.attributes.push(AddressAttribute::Local(v4.into()));
            message.attributes.push(AddressAttribute::Address(v4.into()));
        }
        IpAddr::V6(v6) => {
            message.header.family = AddressFamily::Inet6;
            // The election decides who owns it, not the kernel's DAD (see
            // the module docs).
            message.header.flags = AddressHeaderFlags::Nodad;
            message.attributes.push(AddressAttribute::Address(v6.into()));
        }
    }
    message
}

/// What [`Netlink::link`] learns about an interface.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) index: u32,
    /// The MAC on Ethernet links.
    pub(super) mac: Option<[u8; 6]>,
}

/// A blocking rtnetlink socket connected to the kernel.
pub(crate) struct Netlink {
    socket: netlink_sys::Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl std::fmt::Debug for Netlink {
    // Not the 64 KiB receive buffer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("socket", &self.socket)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Netlink {
    pub(crate) fn open() -> Result<Netlink, Error> {
        let socket_error = |source| Error::Socket {
            what: "netlink",
            source,
        };
        let mut socket = netlink_sys::Socket::new(NETLINK_ROUTE).map_err(socket_error)?;
        socket.bind_auto().map_err(socket_error)?;
        socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(socket_error)?;
        SockRef::from(&socket)
            .set_read_timeout(Some(NETLINK_TIMEOUT))
            .map_err(socket_error)?;
        Ok(Netlink {
            socket,
            sequence: 0,
            buffer: vec![0; 64 * 1024],
        })
    }

    /// An interface's index, by name (RTM_GETLINK; needs no privilege).
    pub(crate) fn index(&mut self, name: &str) -> io::Result<u32> {
        self.link(name).map(|link| link.index)
    }

    /// Sets an interface up (RTM_NEWLINK with IFF_UP in the change mask).
    pub(crate) fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(message), 0).map(drop)
    }

    /// Adds (`add`) or removes an address on an interface. Adding one the
    /// interface has, or removing one it has not, is success.
    pub(crate) fn change_address(&mut self, index: u32, address: IpAddr, prefix_len: u8, add: bool) -> io::Result<()> {
        let message = address_message(index, address, prefix_len);
        let result = if add {
            self.request(RouteNetlinkMessage::NewAddress(message), NLM_F_CREATE | NLM_F_EXCL)
        } else {
            self.request(RouteNetlinkMessage::DelAddress(message), 0)
        };
        match result {
            Err(e) if add && e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) if !add && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Adds (`add`) or removes a host route of type `local` for `address`
    /// on an interface, in the `local` table: the kernel delivers what is
    /// sent to the address to this host's sockets, with no interface
    /// address for a routing daemon to export. Adding one that exists, or
    /// removing one that does not, is success.
    pub(crate) fn change_local_route(&mut self, index: u32, address: IpAddr, add: bool) -> io::Result<()> {
        use netlink_packet_route::route::{
            RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
        };
        /// The kernel's `local` table (RT_TABLE_LOCAL).
        const LOCAL_TABLE: u8 = 255;
        let mut message = RouteMessage::default();
        message.header.address_family = if address.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        message.header.destination_prefix_length = if address.is_ipv4() { 32 } else { 128 };
        message.header.table = LOCAL_TABLE;
        message.header.protocol = RouteProtocol::Static;
        message.header.scope = RouteScope::Host;
        message.header.kind = RouteType::Local;
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(address)));
        message.attributes.push(RouteAttribute::Oif(index));
        let result = if add {
            self.request(RouteNetlinkMessage::NewRoute(message), NLM_F_CREATE | NLM_F_EXCL)
        } else {
            self.request(RouteNetlinkMessage::DelRoute(message), 0)
        };
        match result {
            Err(e) if add && e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) if !add && e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Looks an interface up by name (RTM_GETLINK; needs no privilege).
    pub(super) fn link(&mut self, name: &str) -> io::Result<Link> {
        let mut message = LinkMessage::default();
        message.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let replies = self.request(RouteNetlinkMessage::GetLink(message), 0)?;
        let link = replies
            .into_iter()
            .find_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the kernel sent no link"))?;
        let mac = (link.header.link_layer_type == LinkLayerType::Ether)
            .then(|| {
                link.attributes.iter().find_map(|attribute| match attribute {
                    LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                    _ => None,
                })
            })
            .flatten();
        Ok(Link {
            index: link.header.index,
            mac,
        })
    }

    /// Checks for CAP_NET_ADMIN the way the kernel does: it refuses every
    /// changing rtnetlink request without it (EPERM) before looking at the
    /// request. This one adds to interface index 0, which never exists, so it
    /// can only fail, with ENODEV when permitted.
    pub(super) fn probe_net_admin(&mut self, address: IpAddr) -> Result<(), Error> {
        let message = address_message(0, address, if address.is_ipv4() { 32 } else { 128 });
        match self.request(RouteNetlinkMessage::NewAddress(message), NLM_F_CREATE | NLM_F_EXCL) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(Error::MissingCapability { needs: "CAP_NET_ADMIN" }),
            // ENODEV (or EINVAL from a kernel that validates differently):
            // permitted. Success is impossible for index 0, but would be
            // permitted too.
            _ => Ok(()),
        }
    }

    /// Sends one request with an ACK asked for and collects the replies up to
    /// the ACK. A NACK becomes the kernel's errno.
    pub(super) fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
        packet.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        packet.header.sequence_number = sequence;
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;

        let mut replies = Vec::new();
        loop {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut offset = 0;
            while offset < size {
                let reply: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&self.buffer[offset..size])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = reply.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length;
                // Replies to an earlier request that timed out: not ours.
                if reply.header.sequence_number != sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(replies),
                            Some(_) => Err(error.to_io()),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    _ => {}
                }
            }
        }
    }
}

/// The kernel's notifications of removed addresses, for one address on one
/// interface ([`FloatingIp::watch_removals`](super::FloatingIp::watch_removals)).
/// Non-blocking; poll its file descriptor for readability.
pub struct Removals {
    pub(super) socket: netlink_sys::Socket,
    pub(super) index: u32,
    pub(super) address: IpAddr,
    pub(super) buffer: Vec<u8>,
}

impl std::fmt::Debug for Removals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Removals")
            .field("index", &self.index)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl AsRawFd for Removals {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Removals {
    /// Reads every queued notification: `Ok(true)` if one says the address
    /// left the interface, or if notifications were lost (the queue
    /// overflowed: ENOBUFS), so that it may have. `Err(WouldBlock)` when
    /// nothing was queued.
    pub fn removed(&mut self) -> io::Result<bool> {
        let mut removed = false;
        let mut read = false;
        // Bounded: each round drains one datagram; the queue is finite.
        for _ in 0..READ_BURST {
            let size = match self.socket.recv(&mut &mut self.buffer[..], libc::MSG_DONTWAIT) {
                Ok(size) => size,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    removed = true;
                    read = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            read = true;
            removed |= removal_of(&self.buffer[..size], self.index, self.address);
        }
        if read {
            Ok(removed)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
}

/// Whether a datagram of rtnetlink messages says `address` was removed
/// from interface `index`.
fn removal_of(datagram: &[u8], index: u32, address: IpAddr) -> bool {
    let mut offset = 0;
    while offset < datagram.len() {
        let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..]) else {
            return false;
        };
        let length = message.header.length as usize;
        if length == 0 {
            return false;
        }
        offset += length;
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(m)) = message.payload {
            let ours = m.header.index == index
                && m.attributes.iter().any(|a| match a {
                    AddressAttribute::Address(a) | AddressAttribute::Local(a) => *a == address,
                    _ => false,
                });
            if ours {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 100);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);

    #[test]
    fn a_removal_of_the_address_on_the_interface_is_recognised() {
        let removal = |index, address: IpAddr| {
            let message = address_message(index, address, 24);
            let mut packet = NetlinkMessage::new(
                NetlinkHeader::default(),
                NetlinkPayload::from(RouteNetlinkMessage::DelAddress(message)),
            );
            packet.finalize();
            let mut out = vec![0; packet.buffer_len()];
            packet.serialize(&mut out);
            out
        };
        assert!(removal_of(&removal(3, VIP.into()), 3, VIP.into()));
        assert!(removal_of(&removal(3, VIP6.into()), 3, VIP6.into()));
        assert!(!removal_of(&removal(4, VIP.into()), 3, VIP.into()), "another interface");
        assert!(!removal_of(
            &removal(3, Ipv4Addr::new(198, 18, 7, 1).into()),
            3,
            VIP.into()
        ));
        assert!(!removal_of(&[1, 2, 3], 3, VIP.into()));
    }
}
