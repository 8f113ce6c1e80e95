//! The floating VIP address: the active balancer holds it, the standby does
//! not.
//!
//! Listeners are bound with `IP_FREEBIND` before the address exists (see
//! [`crate::dataplane::proxy::bind`]), so promotion is one netlink request and a few
//! frames, with no re-bind: [`FloatingIp::claim`] adds the address to the
//! interface and announces it so that neighbours repoint their cache entry
//! for it to this host's MAC at once; [`FloatingIp::release`] removes it on
//! step-down. Both are idempotent, so a leadership loop can repeat them
//! without tracking what it did before.
//!
//! # IPv4 and IPv6
//! An IPv4 address is announced with gratuitous ARP (request and reply, as
//! keepalived), probed for with RFC 5227 ARP probes (sender 0.0.0.0). An
//! IPv6 address is announced with unsolicited neighbour advertisements
//! (RFC 4861 §7.2.6: override flag, target link-layer address, to all-nodes
//! ff02::1, hop limit 255) and probed for with duplicate-address-detection
//! solicitations (source ::, to the address's solicited-node group). It is
//! added with `IFA_F_NODAD`: the election decides who owns the address, and
//! the kernel's own DAD would only get in the way. DAD keeps a new address
//! tentative (unusable) for a second, and if anyone answers for it (the
//! leftover of a predecessor killed with -9, still on its host) the kernel
//! marks it `dadfailed` and never uses it: a failover would end with nobody
//! serving. halo probes itself instead ([`FloatingIp::probe`]) and decides
//! with the rule in [`crate::control::ha`] (a leftover answers, a live
//! claimer announces). Frames are built by halo ([`frames`]) and sent from a
//! packet socket ([`neighbours`]), so that a DAD probe can have the
//! unspecified source the kernel would not let a raw socket use;
//! advertisements are read on a raw ICMPv6 socket (only ICMPv6 reaches it,
//! not the data traffic).
//!
//! halo's own advertisements carry one extra option,
//! [`ND_OPT_HALO`](frames::ND_OPT_HALO) (RFC 4727's experimental type 253,
//! which every other node ignores as RFC 4861 §4.6 requires), so that halo
//! can tell an advertisement from a live claimer from a kernel's answer to
//! a probe. IPv4 needs no mark: a kernel answers an ARP probe with a reply
//! whose target is the prober, while an announcement targets the address
//! itself.
//!
//! # Who manages the address on this host
//! [`FloatingIp::open`] binds an abstract unix socket named after the
//! address ([`owner_name`]) and holds it for the life of the
//! [`FloatingIp`]; a second `open` of the same address in the same network
//! namespace fails with [`Error::InUse`]. halo-lb opens the address at
//! start, so `halo-lb release-vip` (which opens it too) refuses while any
//! live halo-lb on this host manages the address, whatever config either
//! was given. Abstract unix sockets live in the network namespace, which is
//! exactly the scope of an interface address: a lock file would depend on
//! a shared file system (a Nomad poststop task or a container sees its own),
//! and a scan of /proc on a shared pid namespace, while the kernel frees the
//! socket when the process dies, even by SIGKILL, so nothing goes stale.
//!
//! # Watching
//! [`FloatingIp::listen`] reads the neighbour-discovery traffic about the
//! address ([`Heard`]); [`FloatingIp::watch_removals`] subscribes to the
//! kernel's address notifications (rtnetlink `RTM_DELADDR`), so that an
//! active notices its address being removed from under it.
//!
//! Calls are blocking but short: one netlink round trip to the kernel (tens
//! of microseconds) and a handful of `sendto` on a packet socket, except
//! [`FloatingIp::probe`], which listens for as long as it is told. They are
//! fine to make from a tokio current_thread runtime's blocking pool.
//!
//! # Layout
//!
//! [`FloatingIp`] is the interface the election uses; beneath it:
//!
//! - [`netlink`]: rtnetlink requests (interfaces, addresses, local routes)
//!   and the kernel's notifications of removed addresses.
//! - [`neighbours`]: the sockets that send and read ARP and neighbour
//!   discovery frames.
//! - [`frames`]: those frames, built and parsed, without sockets.

mod frames;
mod neighbours;
mod netlink;

use std::io;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::protocols::NETLINK_ROUTE;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub(crate) use neighbours::Listener;
use neighbours::{open_icmpv6, Announcer};
use netlink::address_message;
pub(crate) use netlink::{Netlink, Removals};

/// How many announcements one [`FloatingIp::announce`] sends, back to back,
/// as keepalived's `garp_master_repeat`: a lost frame costs nothing while
/// another arrives. (For IPv4 each is a request and a reply.)
pub(crate) const GARP_REPEATS: usize = 3;

/// When to announce again after a claim ([`FloatingIp::announce`]): a
/// neighbour that was busy or a switch that was still learning gets a second
/// chance, as keepalived's `garp_master_delay` (5 s there; sooner here, since
/// clients are waiting).
pub(crate) const REANNOUNCE_AFTER: Duration = Duration::from_secs(2);

/// How long [`FloatingIp::open`] waits for another process's hold on the
/// address to end before it reports [`Error::InUse`]: long enough to outlast
/// a `halo-lb release-vip` (milliseconds) that runs as halo-lb starts.
const OWNER_WAIT: Duration = Duration::from_secs(1);

/// Rtnetlink multicast groups of address changes.
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
/// Frames read per wake-up at most: neighbour traffic is light, but a
/// flood must not keep the reader from everything else.
pub(crate) const READ_BURST: usize = 64;

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
    /// Another live process in this network namespace (a halo-lb, or a
    /// `halo-lb release-vip` under way) manages the address.
    #[error("floating vip_address {address} is in use: a live halo-lb in this network namespace manages it (it holds the address while active, and may claim it any time while standby)")]
    InUse {
        /// The address.
        address: IpAddr,
    },
    /// The blocking task that made the change failed (panicked or was
    /// cancelled).
    #[error("the floating address task failed: {0}")]
    Task(String),
    /// A prefix length over 32 (IPv4) or 128 (IPv6).
    #[error("floating vip_address {address}/{prefix_len}: the prefix length must be at most {max}")]
    BadPrefix {
        /// The address.
        address: IpAddr,
        /// The prefix length given.
        prefix_len: u8,
        /// The longest there is for its family.
        max: u8,
    },
    /// A netlink request failed.
    #[error("vip_interface {interface}: cannot {action} {address}/{prefix_len}: {source}")]
    Netlink {
        /// The interface.
        interface: String,
        /// What was asked ("add", "remove", "look up").
        action: &'static str,
        /// The floating address.
        address: IpAddr,
        /// Its prefix length.
        prefix_len: u8,
        /// The kernel's answer, or the socket error.
        source: io::Error,
    },
    /// Sending or reading ARP or neighbour discovery frames failed (a
    /// claim's address itself was added).
    #[error("vip_interface {interface}: cannot {action} {address}: {source}")]
    Neighbours {
        /// The interface.
        interface: String,
        /// "announce", "probe for" or "listen for".
        action: &'static str,
        /// The floating address.
        address: IpAddr,
        /// The socket error.
        source: io::Error,
    },
    /// A socket could not be opened for another reason than permissions.
    #[error("floating vip_address: cannot open a {what} socket: {source}")]
    Socket {
        /// "netlink", "packet", "ICMPv6" or "unix".
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

/// Something another host said about the floating address (never our own
/// frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Someone probes for it (an ARP probe, a DAD solicitation): about to
    /// claim it. A live holder defends by announcing.
    Probe,
    /// A host answers for it (a kernel's ARP reply, a plain advertisement):
    /// the address is on that host, which may be a live holder or the
    /// leftover of a dead one.
    Answer([u8; 6]),
    /// A host announces it (a gratuitous ARP, an advertisement with halo's
    /// mark): a live claimer, not a leftover.
    Announce([u8; 6]),
}

/// What a [`FloatingIp::probe`] heard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probed {
    /// Hosts that have the address (answered or announced), by MAC.
    pub answering: Vec<[u8; 6]>,
    /// Of those, the ones that announced it: live claimers.
    pub announcing: Vec<[u8; 6]>,
}

/// The abstract unix socket name that marks the process managing `address`
/// in a network namespace (see the module docs).
pub(crate) fn owner_name(address: IpAddr) -> String {
    format!("halo-lb/floating/{address}")
}

/// The floating VIP address on one interface of this network namespace.
///
/// Holds its netlink and packet sockets from [`open`](FloatingIp::open) on:
/// permission problems show at start rather than at the first promotion, and
/// the sockets stay tied to the namespace they were opened in. Holds the
/// address's owner socket too (see the module docs).
#[derive(Debug)]
pub struct FloatingIp {
    address: IpAddr,
    prefix_len: u8,
    interface: String,
    index: u32,
    /// This interface's MAC and a packet socket to announce it from; `None`
    /// on links without Ethernet addresses (loopback, tunnels), which have
    /// no neighbours to tell.
    neighbours: Option<Announcer>,
    netlink: Mutex<Netlink>,
    _owner: std::os::unix::net::UnixDatagram,
}

impl FloatingIp {
    /// Resolves `interface`, checks up front that this process may change
    /// its addresses (CAP_NET_ADMIN) and send raw frames (CAP_NET_RAW), and
    /// takes the address's owner socket ([`Error::InUse`] if another live
    /// process here has it). Changes nothing on the interface. Must be
    /// called in the network namespace whose interface is meant.
    pub fn open(address: IpAddr, prefix_len: u8, interface: &str) -> Result<FloatingIp, Error> {
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(Error::BadPrefix {
                address,
                prefix_len,
                max,
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
        let neighbours = match link.mac {
            Some(mac) => Some(Announcer::open(link.index, interface, mac, address)?),
            None => None,
        };
        let owner = hold_owner(address)?;
        Ok(FloatingIp {
            address,
            prefix_len,
            interface: interface.to_owned(),
            index: link.index,
            neighbours,
            netlink: Mutex::new(netlink),
            _owner: owner,
        })
    }

    /// The floating address.
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// The interface it goes on.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// This interface's MAC, on Ethernet links.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.neighbours.as_ref().map(|n| n.mac)
    }

    /// Adds the address to the interface (already present is success;
    /// IPv6 with `IFA_F_NODAD`, see the module docs), then announces it.
    /// Announces even when the address was already there: a neighbour may
    /// have been told otherwise meanwhile.
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

    /// Sends `GARP_REPEATS` announcements of the address from this
    /// interface's MAC: gratuitous ARP request-and-reply pairs (IPv4) or
    /// unsolicited neighbour advertisements with the override flag (IPv6).
    /// [`claim`](FloatingIp::claim) does this once; call it again
    /// `REANNOUNCE_AFTER` a promotion, and to defend the address.
    pub fn announce(&self) -> Result<(), Error> {
        let Some(n) = &self.neighbours else {
            return Ok(());
        };
        n.announce().map_err(|source| self.neighbours_error("announce", source))
    }

    /// Sends one probe for the address while holding it: hosts that also
    /// have it answer to us alone. IPv4: an RFC 5227 ARP probe (a kernel
    /// answers it with a unicast reply). IPv6: a plain solicitation from our
    /// link-local address, not a DAD one, which every holder would answer
    /// with a multicast advertisement carrying the override flag that
    /// repoints every neighbour (a dead host's leftover too). Read the
    /// answers with [`listen`](FloatingIp::listen).
    pub fn send_probe(&self) -> Result<(), Error> {
        let Some(n) = &self.neighbours else {
            return Ok(());
        };
        n.probe(false)
            .map_err(|source| self.neighbours_error("probe for", source))
    }

    /// Who else has the address: sends a probe and collects, for `wait`,
    /// what other hosts answer or announce. A host that still has it (a
    /// balancer killed with -9 before it could remove it) answers; a live
    /// claimer (a halo-lb holding it, which defends it) announces. Blocks
    /// up to `wait`.
    pub fn probe(&self, wait: Duration) -> Result<Probed, Error> {
        let Some(listener) = self.listen()? else {
            return Ok(Probed::default());
        };
        if let Some(n) = &self.neighbours {
            // Before a claim: a probe that claims nothing (RFC 5227, RFC
            // 4862 DAD), which a live holder defends against.
            n.probe(true)
                .map_err(|source| self.neighbours_error("probe for", source))?;
        }
        let deadline = Instant::now() + wait;
        let mut heard = Probed::default();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            listener
                .set_read_timeout(left)
                .map_err(|source| self.neighbours_error("listen for", source))?;
            match listener.recv() {
                Ok(Some(Heard::Answer(mac))) => push_new(&mut heard.answering, mac),
                Ok(Some(Heard::Announce(mac))) => {
                    push_new(&mut heard.answering, mac);
                    push_new(&mut heard.announcing, mac);
                }
                Ok(Some(Heard::Probe) | None) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(self.neighbours_error("listen for", source)),
            }
        }
        Ok(heard)
    }

    /// A socket that reads what other hosts say about the address
    /// (`Listener::recv`); `None` on links without neighbours. Blocking;
    /// `Listener::set_nonblocking` for an event loop.
    pub fn listen(&self) -> Result<Option<Listener>, Error> {
        let Some(n) = &self.neighbours else {
            return Ok(None);
        };
        let socket = match self.address {
            IpAddr::V4(_) => {
                // A socket of its own that receives ARP on this link only.
                let protocol = Protocol::from(i32::from((libc::ETH_P_ARP as u16).to_be()));
                let socket = Socket::new(Domain::PACKET, Type::DGRAM, Some(protocol))
                    .map_err(|source| Error::Socket { what: "packet", source })?;
                let bound = link_address(self.index, libc::ETH_P_ARP as u16, [0xff; 6]).and_then(|at| socket.bind(&at));
                bound.map_err(|source| self.neighbours_error("listen for", source))?;
                socket
            }
            IpAddr::V6(_) => open_icmpv6(&self.interface)?,
        };
        Ok(Some(Listener {
            socket,
            address: self.address,
            mac: n.mac,
        }))
    }

    /// Subscribes to the kernel's notifications of removed addresses of this
    /// address's family; `Removals::removed` says whether this address
    /// left this interface. Opened before a claim, it sees every removal
    /// after it.
    pub fn watch_removals(&self) -> Result<Removals, Error> {
        let socket_error = |source| Error::Socket {
            what: "netlink",
            source,
        };
        let mut socket = netlink_sys::Socket::new(NETLINK_ROUTE).map_err(socket_error)?;
        socket.bind_auto().map_err(socket_error)?;
        let group = if self.address.is_ipv4() {
            RTNLGRP_IPV4_IFADDR
        } else {
            RTNLGRP_IPV6_IFADDR
        };
        socket.add_membership(group).map_err(socket_error)?;
        socket.set_non_blocking(true).map_err(socket_error)?;
        Ok(Removals {
            socket,
            index: self.index,
            address: self.address,
            buffer: vec![0; 64 * 1024],
        })
    }

    /// Removes the address from the interface (already absent is success).
    pub fn release(&self) -> Result<Outcome, Error> {
        match self.change(RouteNetlinkMessage::DelAddress(self.message()), 0) {
            Ok(()) => Ok(Outcome::Changed),
            // What both families answer for an address the interface does
            // not have.
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

    fn neighbours_error(&self, action: &'static str, source: io::Error) -> Error {
        Error::Neighbours {
            interface: self.interface.clone(),
            action,
            address: self.address,
            source,
        }
    }
}

fn push_new(list: &mut Vec<[u8; 6]>, mac: [u8; 6]) {
    if !list.contains(&mac) {
        list.push(mac);
    }
}

/// Binds the owner socket of `address`, waiting up to [`OWNER_WAIT`] for
/// another process to let go of it.
fn hold_owner(address: IpAddr) -> Result<std::os::unix::net::UnixDatagram, Error> {
    use std::os::linux::net::SocketAddrExt;
    let name = std::os::unix::net::SocketAddr::from_abstract_name(owner_name(address).as_bytes())
        .map_err(|source| Error::Socket { what: "unix", source })?;
    let deadline = Instant::now() + OWNER_WAIT;
    loop {
        match std::os::unix::net::UnixDatagram::bind_addr(&name) {
            Ok(socket) => return Ok(socket),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if Instant::now() >= deadline {
                    return Err(Error::InUse { address });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => return Err(Error::Socket { what: "unix", source }),
        }
    }
}

/// The link-layer address `mac` on interface `index`, for frames of
/// `protocol`: with a SOCK_DGRAM packet socket the kernel builds the
/// Ethernet header from it (that destination, our MAC as source, that type).
#[allow(unsafe_code)]
fn link_address(index: u32, protocol: u16, mac: [u8; 6]) -> io::Result<SockAddr> {
    let index = i32::try_from(index).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index"))?;
    let address = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: protocol.to_be(),
        sll_ifindex: index,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0],
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
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 100);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);

    #[test]
    fn open_rejects_long_prefixes_before_touching_the_kernel() {
        let e = FloatingIp::open(VIP.into(), 33, "lo").unwrap_err();
        assert_eq!(
            e.to_string(),
            "floating vip_address 198.18.7.100/33: the prefix length must be at most 32"
        );
        let e = FloatingIp::open(VIP6.into(), 129, "lo").unwrap_err();
        assert_eq!(
            e.to_string(),
            "floating vip_address 2001:2::100/129: the prefix length must be at most 128"
        );
    }

    /// Interface lookups need no privilege, so this runs anywhere.
    #[test]
    fn open_names_a_missing_interface() {
        let e = FloatingIp::open(VIP.into(), 24, "halo-none0").unwrap_err();
        assert_eq!(e.to_string(), "vip_interface halo-none0: no such interface");
    }

    /// Abstract unix sockets need no privilege either.
    #[test]
    fn one_process_at_a_time_manages_an_address() {
        let address: IpAddr = "198.18.254.77".parse().unwrap();
        let held = hold_owner(address).unwrap();
        let e = hold_owner(address).unwrap_err();
        assert!(matches!(e, Error::InUse { .. }), "{e}");
        assert!(e.to_string().contains("is in use"), "{e}");
        drop(held);
        hold_owner(address).expect("free again once the holder let go");
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
