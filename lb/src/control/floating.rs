//! The floating VIP address: the active balancer holds it, the standby does
//! not.
//!
//! Listeners are bound with `IP_FREEBIND` before the address exists (see
//! [`crate::dataplane::proxy::bind`]), so promotion is one netlink request and a few
//! ARP frames, with no re-bind: [`FloatingIp::claim`] adds the address to the
//! interface and sends gratuitous ARP so that neighbours repoint their cache
//! entry for it to this host's MAC at once; [`FloatingIp::release`] removes
//! it on step-down. Both are idempotent, so a leadership loop can repeat them
//! without tracking what it did before.
//!
//! IPv4 only: IPv6 would need an unsolicited neighbour advertisement and
//! duplicate-address detection handling instead of ARP, which halo does not
//! implement; [`FloatingIp::open`] rejects an IPv6 address.
//!
//! Calls are blocking but short: one netlink round trip to the kernel (tens
//! of microseconds) and a handful of `sendto` on a packet socket. They are
//! fine to make from a tokio current_thread runtime; nothing waits on the
//! network.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use socket2::{Domain, SockAddr, SockRef, Socket, Type};

/// How many request-and-reply pairs one announcement sends, back to back, as
/// keepalived's `garp_master_repeat`: a lost frame costs nothing while
/// another arrives.
pub(crate) const GARP_REPEATS: usize = 3;

/// When to announce again after a claim ([`FloatingIp::announce`]): a
/// neighbour that was busy or a switch that was still learning gets a second
/// chance, as keepalived's `garp_master_delay` (5 s there; sooner here, since
/// clients are waiting).
pub(crate) const REANNOUNCE_AFTER: Duration = Duration::from_secs(2);

/// Bounds every netlink receive; the kernel answers at once, so hitting it
/// means something is badly wrong, and the caller should hear about it rather
/// than hang.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the floating address cannot be opened, claimed or released.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process lacks a capability the floating address needs.
    #[error("floating vip_address needs {needs} (run as root or grant the capability)")]
    MissingCapability {
        /// The capability, and what for when that is not obvious.
        needs: &'static str,
    },
    /// `vip_interface` names no interface in this network namespace.
    #[error("vip_interface {0}: no such interface")]
    NoSuchInterface(String),
    /// The blocking task that made the change failed (panicked or was
    /// cancelled).
    #[error("the floating address task failed: {0}")]
    Task(String),
    /// An IPv6 `vip_address`.
    #[error("floating vip_address {0}: only IPv4 is supported (IPv6 would need unsolicited neighbour advertisements)")]
    Ipv6Unsupported(IpAddr),
    /// A prefix length over 32.
    #[error("floating vip_address {address}/{prefix_len}: the prefix length must be at most 32")]
    BadPrefix {
        /// The address.
        address: IpAddr,
        /// The prefix length given.
        prefix_len: u8,
    },
    /// A netlink request failed.
    #[error("vip_interface {interface}: cannot {action} {address}/{prefix_len}: {source}")]
    Netlink {
        /// The interface.
        interface: String,
        /// What was asked ("add", "remove", "look up").
        action: &'static str,
        /// The floating address.
        address: Ipv4Addr,
        /// Its prefix length.
        prefix_len: u8,
        /// The kernel's answer, or the socket error.
        source: io::Error,
    },
    /// Sending gratuitous ARP failed (the address itself was added).
    #[error("vip_interface {interface}: cannot send gratuitous ARP for {address}: {source}")]
    Arp {
        /// The interface.
        interface: String,
        /// The floating address.
        address: Ipv4Addr,
        /// The socket error.
        source: io::Error,
    },
    /// A socket could not be opened for another reason than permissions.
    #[error("floating vip_address: cannot open a {what} socket: {source}")]
    Socket {
        /// "netlink" or "packet".
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// What a [`FloatingIp::claim`] or [`FloatingIp::release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The address was added (claim) or removed (release).
    Changed,
    /// It was already there (claim) or already gone (release).
    Unchanged,
}

/// The floating VIP address on one interface of this network namespace.
///
/// Holds its netlink and packet sockets from [`open`](FloatingIp::open) on:
/// permission problems show at start rather than at the first promotion, and
/// the sockets stay tied to the namespace they were opened in.
#[derive(Debug)]
pub struct FloatingIp {
    address: Ipv4Addr,
    prefix_len: u8,
    interface: String,
    index: u32,
    /// This interface's MAC and a packet socket to announce it from; `None`
    /// on links without Ethernet addresses (loopback, tunnels), which have
    /// no neighbours to tell.
    arp: Option<Announcer>,
    netlink: Mutex<Netlink>,
}

impl FloatingIp {
    /// Resolves `interface`, and checks up front that this process may change
    /// its addresses (CAP_NET_ADMIN) and send raw ARP frames (CAP_NET_RAW).
    /// Changes nothing. Must be called in the network namespace whose
    /// interface is meant.
    pub fn open(address: IpAddr, prefix_len: u8, interface: &str) -> Result<FloatingIp, Error> {
        let address = match address {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => return Err(Error::Ipv6Unsupported(address)),
        };
        if prefix_len > 32 {
            return Err(Error::BadPrefix {
                address: address.into(),
                prefix_len,
            });
        }
        let mut netlink = Netlink::open()?;
        let link = netlink.link(interface).map_err(|source| {
            if source.raw_os_error() == Some(libc::ENODEV) {
                Error::NoSuchInterface(interface.to_owned())
            } else {
                Error::Netlink {
                    interface: interface.to_owned(),
                    action: "look up the interface for",
                    address,
                    prefix_len,
                    source,
                }
            }
        })?;
        netlink.probe_net_admin(address)?;
        let arp = match link.mac {
            Some(mac) => Some(Announcer::open(link.index, mac)?),
            None => None,
        };
        Ok(FloatingIp {
            address,
            prefix_len,
            interface: interface.to_owned(),
            index: link.index,
            arp,
            netlink: Mutex::new(netlink),
        })
    }

    /// The floating address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The interface it goes on.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Adds the address to the interface (already present is success), then
    /// announces it with gratuitous ARP. Announces even when the address was
    /// already there: a neighbour may have been told otherwise meanwhile.
    pub fn claim(&self) -> Result<Outcome, Error> {
        let outcome = match self.change(
            RouteNetlinkMessage::NewAddress(self.message()),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(()) => Outcome::Changed,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Outcome::Unchanged,
            Err(source) => return Err(self.netlink_error("add", source)),
        };
        self.announce()?;
        Ok(outcome)
    }

    /// Sends [`GARP_REPEATS`] gratuitous ARP request-and-reply pairs for the
    /// address from this interface's MAC. [`claim`](FloatingIp::claim) does
    /// this once; call it again [`REANNOUNCE_AFTER`] a promotion.
    pub fn announce(&self) -> Result<(), Error> {
        let Some(arp) = &self.arp else {
            return Ok(());
        };
        arp.announce(self.address).map_err(|source| Error::Arp {
            interface: self.interface.clone(),
            address: self.address,
            source,
        })
    }

    /// Who else answers ARP for the address: sends an ARP probe for it
    /// (RFC 5227: sender address 0.0.0.0, so no neighbour learns anything
    /// from it) and collects, for `wait`, the MACs other than ours that
    /// claim the address. A host that still has it (a balancer killed with
    /// -9 before it could remove it) answers. Blocks up to `wait`.
    pub fn others_answering(&self, wait: Duration) -> Result<Vec<[u8; 6]>, Error> {
        let Some(arp) = &self.arp else {
            return Ok(Vec::new());
        };
        arp.probe(self.index, self.address, wait).map_err(|source| Error::Arp {
            interface: self.interface.clone(),
            address: self.address,
            source,
        })
    }

    /// Removes the address from the interface (already absent is success).
    pub fn release(&self) -> Result<Outcome, Error> {
        match self.change(RouteNetlinkMessage::DelAddress(self.message()), 0) {
            Ok(()) => Ok(Outcome::Changed),
            // What IPv4 answers for an address the interface does not have.
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(Outcome::Unchanged),
            Err(source) => Err(self.netlink_error("remove", source)),
        }
    }

    fn message(&self) -> AddressMessage {
        address_message(self.index, self.address, self.prefix_len)
    }

    fn change(&self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        // A poisoned lock only means another call panicked mid-request; the
        // socket itself is still usable, and `request` skips stale replies.
        let mut netlink = self.netlink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        netlink.request(message, flags).map(drop)
    }

    fn netlink_error(&self, action: &'static str, source: io::Error) -> Error {
        if source.raw_os_error() == Some(libc::EPERM) {
            return Error::MissingCapability { needs: "CAP_NET_ADMIN" };
        }
        Error::Netlink {
            interface: self.interface.clone(),
            action,
            address: self.address,
            prefix_len: self.prefix_len,
            source,
        }
    }
}

fn address_message(index: u32, address: Ipv4Addr, prefix_len: u8) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = prefix_len;
    message.header.scope = AddressScope::Universe;
    message.header.index = index;
    // IPv4 wants both: LOCAL is the interface's own address, ADDRESS the
    // peer's on point-to-point links and the same otherwise (as `ip addr add`).
    message.attributes.push(AddressAttribute::Local(address.into()));
    message.attributes.push(AddressAttribute::Address(address.into()));
    message
}

/// What [`Netlink::link`] learns about an interface.
#[derive(Debug)]
struct Link {
    index: u32,
    /// The MAC on Ethernet links.
    mac: Option<[u8; 6]>,
}

/// A blocking rtnetlink socket connected to the kernel.
struct Netlink {
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
    fn open() -> Result<Netlink, Error> {
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

    /// Looks an interface up by name (RTM_GETLINK; needs no privilege).
    fn link(&mut self, name: &str) -> io::Result<Link> {
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
    fn probe_net_admin(&mut self, address: Ipv4Addr) -> Result<(), Error> {
        let message = address_message(0, address, 32);
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
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
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

/// A packet socket that sends ARP frames out of one interface.
#[derive(Debug)]
struct Announcer {
    socket: Socket,
    destination: SockAddr,
    mac: [u8; 6],
}

impl Announcer {
    fn open(index: u32, mac: [u8; 6]) -> Result<Announcer, Error> {
        // Protocol 0: a send-only socket. With ETH_P_ARP the kernel would
        // queue every ARP frame on the link to it, for nobody to read.
        let socket = Socket::new(Domain::PACKET, Type::DGRAM, None).map_err(|source| {
            if source.raw_os_error() == Some(libc::EPERM) {
                Error::MissingCapability {
                    needs: "CAP_NET_RAW to send gratuitous ARP",
                }
            } else {
                Error::Socket { what: "packet", source }
            }
        })?;
        let destination = link_broadcast(index).map_err(|source| Error::Socket { what: "packet", source })?;
        Ok(Announcer {
            socket,
            destination,
            mac,
        })
    }

    /// Both kinds, as keepalived and arping -U/-A: some hosts only heed
    /// requests, some only replies. Linux updates an existing entry from
    /// either, even within its `locktime`, because they are gratuitous
    /// (sender IP = target IP).
    fn announce(&self, address: Ipv4Addr) -> io::Result<()> {
        let request = garp(ArpOp::Request, self.mac, address);
        let reply = garp(ArpOp::Reply, self.mac, address);
        for _ in 0..GARP_REPEATS {
            self.socket.send_to(&request, &self.destination)?;
            self.socket.send_to(&reply, &self.destination)?;
        }
        tracing::debug!(%address, frames = 2 * GARP_REPEATS, "gratuitous ARP sent");
        Ok(())
    }
}

impl Announcer {
    /// Sends an ARP probe for `address` and reads ARP frames on the link for
    /// `wait`, returning the other MACs that claim `address`.
    fn probe(&self, index: u32, address: Ipv4Addr, wait: Duration) -> io::Result<Vec<[u8; 6]>> {
        // A socket of its own that receives ARP: opened per probe, so no
        // frames queue up for nobody between probes.
        let protocol = socket2::Protocol::from(i32::from((libc::ETH_P_ARP as u16).to_be()));
        let listener = Socket::new(Domain::PACKET, Type::DGRAM, Some(protocol))?;
        listener.bind(&link_broadcast(index)?)?;
        self.socket.send_to(&arp_probe(self.mac, address), &self.destination)?;
        let deadline = std::time::Instant::now() + wait;
        let mut others = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            listener.set_read_timeout(Some(left))?;
            let n = match io::Read::read(&mut &listener, &mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let frame = &buf[..n];
            if let Some(mac) = claimant(frame, address) {
                if mac != self.mac && !others.contains(&mac) {
                    others.push(mac);
                }
            }
        }
        Ok(others)
    }
}

/// An ARP probe (RFC 5227) for `address` from `mac`: sender IP 0.0.0.0,
/// target MAC zero.
fn arp_probe(mac: [u8; 6], address: Ipv4Addr) -> [u8; 28] {
    let mut packet = garp(ArpOp::Request, mac, address);
    packet[14..18].copy_from_slice(&[0, 0, 0, 0]);
    packet
}

/// The sender MAC of an ARP frame whose sender IP is `address`: a host
/// answering for it, or announcing it.
fn claimant(frame: &[u8], address: Ipv4Addr) -> Option<[u8; 6]> {
    if frame.len() < 28 || frame[0..2] != [0, 1] || frame[2..4] != [8, 0] || frame[4] != 6 || frame[5] != 4 {
        return None;
    }
    (frame[14..18] == address.octets()).then(|| {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&frame[8..14]);
        mac
    })
}

#[derive(Debug, Clone, Copy)]
enum ArpOp {
    Request = 1,
    Reply = 2,
}

/// An ARP packet (RFC 826) announcing `address` at `mac`: sender and target
/// IP are both the address. Requests leave the target MAC zero (RFC 5227's
/// announcement); replies repeat the sender MAC there, which Linux requires
/// to treat a reply as gratuitous.
fn garp(op: ArpOp, mac: [u8; 6], address: Ipv4Addr) -> [u8; 28] {
    let mut packet = [0u8; 28];
    packet[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    packet[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    packet[4] = 6;
    packet[5] = 4;
    packet[6..8].copy_from_slice(&(op as u16).to_be_bytes());
    packet[8..14].copy_from_slice(&mac);
    packet[14..18].copy_from_slice(&address.octets());
    if matches!(op, ArpOp::Reply) {
        packet[18..24].copy_from_slice(&mac);
    }
    packet[24..28].copy_from_slice(&address.octets());
    packet
}

/// The link-layer broadcast address of interface `index`, for ARP: with a
/// SOCK_DGRAM packet socket the kernel builds the Ethernet header from it
/// (destination ff:ff:ff:ff:ff:ff, our MAC as source, type ARP).
#[allow(unsafe_code)]
fn link_broadcast(index: u32) -> io::Result<SockAddr> {
    let index = i32::try_from(index).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index"))?;
    let address = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: (libc::ETH_P_ARP as u16).to_be(),
        sll_ifindex: index,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0],
    };
    // SAFETY: socket2 hands us zeroed storage of `sockaddr_storage`, which is
    // larger than `sockaddr_ll` and aligned for every socket address type, so
    // writing one `sockaddr_ll` at its start stays in bounds and aligned. The
    // family field (AF_PACKET) and the length we report match what we wrote,
    // which is what `SockAddr` requires for its later uses as a `sockaddr`.
    let ((), address) = unsafe {
        SockAddr::try_init(|storage, len| {
            storage.cast::<libc::sockaddr_ll>().write(address);
            *len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            Ok(())
        })?
    };
    Ok(address)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 100);

    #[test]
    fn an_arp_probe_has_no_sender_address_and_claimants_are_read_from_replies() {
        let p = arp_probe(MAC, VIP);
        assert_eq!(&p[6..8], &1u16.to_be_bytes(), "a request");
        assert_eq!(&p[14..18], &[0, 0, 0, 0], "sender IP 0.0.0.0 (RFC 5227)");
        assert_eq!(&p[24..28], &VIP.octets());
        // Another host's reply for the VIP names its MAC; our own probe and
        // frames about other addresses name nobody.
        let other = [0x02, 0, 0, 0, 0, 0x0c];
        assert_eq!(claimant(&garp(ArpOp::Reply, other, VIP), VIP), Some(other));
        assert_eq!(claimant(&p, VIP), None);
        assert_eq!(
            claimant(&garp(ArpOp::Reply, other, Ipv4Addr::new(198, 18, 7, 1)), VIP),
            None
        );
        assert_eq!(claimant(&[0u8; 10], VIP), None);
    }

    #[test]
    fn garp_request_announces_the_address_with_a_zero_target_mac() {
        let p = garp(ArpOp::Request, MAC, VIP);
        assert_eq!(&p[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &MAC);
        assert_eq!(&p[14..18], &VIP.octets());
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &VIP.octets());
    }

    #[test]
    fn garp_reply_repeats_the_sender_mac_as_target() {
        let p = garp(ArpOp::Reply, MAC, VIP);
        assert_eq!(&p[6..8], &[0, 2]);
        assert_eq!(&p[18..24], &MAC);
        assert_eq!(&p[14..18], &p[24..28], "gratuitous: sender IP = target IP");
    }

    #[test]
    fn open_rejects_ipv6_and_long_prefixes_before_touching_the_kernel() {
        let e = FloatingIp::open("2001:db8::1".parse().unwrap(), 64, "lo").unwrap_err();
        assert!(matches!(e, Error::Ipv6Unsupported(_)), "{e}");
        assert!(e.to_string().contains("only IPv4"), "{e}");
        let e = FloatingIp::open(VIP.into(), 33, "lo").unwrap_err();
        assert_eq!(
            e.to_string(),
            "floating vip_address 198.18.7.100/33: the prefix length must be at most 32"
        );
    }

    /// Interface lookups need no privilege, so this runs anywhere.
    #[test]
    fn open_names_a_missing_interface() {
        let e = FloatingIp::open(VIP.into(), 24, "halo-none0").unwrap_err();
        assert_eq!(e.to_string(), "vip_interface halo-none0: no such interface");
    }

    #[test]
    fn missing_capability_says_what_to_do() {
        let e = Error::MissingCapability { needs: "CAP_NET_ADMIN" };
        assert_eq!(
            e.to_string(),
            "floating vip_address needs CAP_NET_ADMIN (run as root or grant the capability)"
        );
    }
}
