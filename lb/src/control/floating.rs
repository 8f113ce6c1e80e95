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
//! claimer announces). Frames are built here and sent from a packet socket,
//! so that a DAD probe can have the unspecified source the kernel would not
//! let a raw socket use; advertisements are read on a raw ICMPv6 socket
//! (only ICMPv6 reaches it, not the data traffic).
//!
//! halo's own advertisements carry one extra option, [`ND_OPT_HALO`]
//! (RFC 4727's experimental type 253, which every other node ignores as
//! RFC 4861 §4.6 requires), so that halo can tell an advertisement from a
//! live claimer from a kernel's answer to a probe. IPv4 needs no mark: a
//! kernel answers an ARP probe with a reply whose target is the prober,
//! while an announcement targets the address itself.
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

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

/// How many announcements one [`FloatingIp::announce`] sends, back to back,
/// as keepalived's `garp_master_repeat`: a lost frame costs nothing while
/// another arrives. (For IPv4 each is a request and a reply.)
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

/// How long [`FloatingIp::open`] waits for another process's hold on the
/// address to end before it reports [`Error::InUse`]: long enough to outlast
/// a `halo-lb release-vip` (milliseconds) that runs as halo-lb starts.
const OWNER_WAIT: Duration = Duration::from_secs(1);

/// The neighbour-discovery option type halo's advertisements carry (RFC
/// 4727: "RFC3692-style Experiment 1"), with [`HALO_MARK`] as its payload.
pub(crate) const ND_OPT_HALO: u8 = 253;
const HALO_MARK: [u8; 6] = *b"halo\0\x01";

const ETH_P_IPV6: u16 = 0x86dd;
const ICMPV6: u8 = 58;
const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
/// ND options: source and target link-layer address.
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;
/// The override flag of a neighbour advertisement (first flags byte).
const NA_OVERRIDE: u8 = 0x20;
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

/// A raw ICMPv6 socket that reads neighbour discovery on `interface`.
fn open_icmpv6(interface: &str) -> Result<Socket, Error> {
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
struct Link {
    index: u32,
    /// The MAC on Ethernet links.
    mac: Option<[u8; 6]>,
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
    fn probe_net_admin(&mut self, address: IpAddr) -> Result<(), Error> {
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

/// The kernel's notifications of removed addresses, for one address on one
/// interface ([`FloatingIp::watch_removals`]). Non-blocking; poll its file
/// descriptor for readability.
pub struct Removals {
    socket: netlink_sys::Socket,
    index: u32,
    address: IpAddr,
    buffer: Vec<u8>,
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

/// A socket reading what other hosts say about the floating address
/// ([`FloatingIp::listen`]).
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    address: IpAddr,
    mac: [u8; 6],
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

    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.socket.set_read_timeout(Some(timeout))
    }
}

/// What an ARP packet (RFC 826, Ethernet/IPv4) from another host says about
/// `address`.
fn heard_arp(frame: &[u8], address: Ipv4Addr, ours: [u8; 6]) -> Option<Heard> {
    if frame.len() < 28 || frame[0..2] != [0, 1] || frame[2..4] != [8, 0] || frame[4] != 6 || frame[5] != 4 {
        return None;
    }
    let op = u16::from_be_bytes([frame[6], frame[7]]);
    let mut sender = [0u8; 6];
    sender.copy_from_slice(&frame[8..14]);
    if sender == ours {
        return None;
    }
    let (sender_ip, target_ip) = (&frame[14..18], &frame[24..28]);
    let address = address.octets();
    if op == ArpOp::Request as u16 && sender_ip == [0, 0, 0, 0] && target_ip == address {
        Some(Heard::Probe)
    } else if sender_ip == address && target_ip == address {
        Some(Heard::Announce(sender))
    } else if sender_ip == address {
        Some(Heard::Answer(sender))
    } else {
        None
    }
}

/// What an ICMPv6 message (as a raw socket reads it, without the IPv6
/// header) from another host says about `address`.
fn heard_nd(message: &[u8], address: Ipv6Addr, ours: [u8; 6]) -> Option<Heard> {
    if message.len() < 24 || message[1] != 0 || message[8..24] != address.octets() {
        return None;
    }
    let options = nd_options(&message[24..]);
    match message[0] {
        // A solicitation without a source link-layer address comes from the
        // unspecified address (RFC 4861 §4.3): duplicate address detection.
        NEIGHBOUR_SOLICITATION => (!options.iter().any(|(kind, _)| *kind == ND_OPT_SOURCE_LL)).then_some(Heard::Probe),
        NEIGHBOUR_ADVERTISEMENT => {
            let mac = options.iter().find_map(|(kind, data)| {
                (*kind == ND_OPT_TARGET_LL)
                    .then(|| <[u8; 6]>::try_from(data.get(..6)?).ok())
                    .flatten()
            })?;
            if mac == ours {
                return None;
            }
            let marked = options
                .iter()
                .any(|(kind, data)| *kind == ND_OPT_HALO && data.starts_with(&HALO_MARK));
            Some(if marked {
                Heard::Announce(mac)
            } else {
                Heard::Answer(mac)
            })
        }
        _ => None,
    }
}

/// The options of a neighbour discovery message (type, data), as far as
/// they are well formed.
fn nd_options(mut bytes: &[u8]) -> Vec<(u8, &[u8])> {
    let mut options = Vec::new();
    // Each option is at least 8 bytes, so this ends within len / 8 rounds.
    while bytes.len() >= 8 {
        let (kind, units) = (bytes[0], usize::from(bytes[1]));
        let length = units * 8;
        if length == 0 || length > bytes.len() {
            break;
        }
        options.push((kind, &bytes[2..length]));
        bytes = &bytes[length..];
    }
    options
}

/// A packet socket that sends ARP or neighbour-discovery frames out of one
/// interface, for one address; for IPv6 also a raw ICMPv6 socket, whose
/// solicitations the kernel sends from our link-local address.
#[derive(Debug)]
struct Announcer {
    socket: Socket,
    icmp: Option<Socket>,
    index: u32,
    mac: [u8; 6],
    address: IpAddr,
}

impl Announcer {
    fn open(index: u32, interface: &str, mac: [u8; 6], address: IpAddr) -> Result<Announcer, Error> {
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
    fn announce(&self) -> io::Result<()> {
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
    fn probe(&self, dad: bool) -> io::Result<()> {
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

/// An ARP probe (RFC 5227) for `address` from `mac`: sender IP 0.0.0.0,
/// target MAC zero.
fn arp_probe(mac: [u8; 6], address: Ipv4Addr) -> [u8; 28] {
    let mut packet = garp(ArpOp::Request, mac, address);
    packet[14..18].copy_from_slice(&[0, 0, 0, 0]);
    packet
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

/// An unsolicited neighbour advertisement of `address` at `mac` (RFC 4861
/// §7.2.6): override set, solicited clear, the target link-layer address,
/// and halo's mark.
fn unsolicited_na(mac: [u8; 6], address: Ipv6Addr) -> [u8; 40] {
    let mut m = [0u8; 40];
    m[0] = NEIGHBOUR_ADVERTISEMENT;
    m[4] = NA_OVERRIDE;
    m[8..24].copy_from_slice(&address.octets());
    m[24] = ND_OPT_TARGET_LL;
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    m[32] = ND_OPT_HALO;
    m[33] = 1;
    m[34..40].copy_from_slice(&HALO_MARK);
    m
}

/// A duplicate-address-detection solicitation for `address` (RFC 4862
/// §5.4.2): sent from the unspecified address, so without a source
/// link-layer address.
fn dad_solicitation(address: Ipv6Addr) -> [u8; 24] {
    let mut m = [0u8; 24];
    m[0] = NEIGHBOUR_SOLICITATION;
    m[8..24].copy_from_slice(&address.octets());
    m
}

/// A neighbour solicitation for `address` from a host with an address
/// (RFC 4861 §4.3): with our link-local address, answered by unicast.
fn solicitation(mac: [u8; 6], address: Ipv6Addr) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[..24].copy_from_slice(&dad_solicitation(address));
    m[24] = ND_OPT_SOURCE_LL;
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    m
}

/// The solicited-node multicast group of `address` (ff02::1:ffXX:XXXX).
fn solicited_node(address: Ipv6Addr) -> Ipv6Addr {
    let o = address.octets();
    Ipv6Addr::from([0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]])
}

/// The Ethernet address of an IPv6 multicast group (RFC 2464 §7).
fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// An IPv6 packet carrying ICMPv6 `message` (its checksum filled in), hop
/// limit 255 as neighbour discovery requires.
fn ipv6_packet(source: Ipv6Addr, destination: Ipv6Addr, message: &[u8]) -> Vec<u8> {
    let length = u16::try_from(message.len()).expect("neighbour discovery messages are small");
    let mut packet = Vec::with_capacity(40 + message.len());
    packet.extend_from_slice(&[0x60, 0, 0, 0]);
    packet.extend_from_slice(&length.to_be_bytes());
    packet.extend_from_slice(&[ICMPV6, 255]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    let start = packet.len();
    packet.extend_from_slice(message);
    packet[start + 2..start + 4].copy_from_slice(&[0, 0]);
    let checksum = icmpv6_checksum(source, destination, &packet[start..]);
    packet[start + 2..start + 4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// The ICMPv6 checksum (RFC 4443 §2.3) over the pseudo-header and
/// `message`, whose checksum field is zero.
fn icmpv6_checksum(source: Ipv6Addr, destination: Ipv6Addr, message: &[u8]) -> u16 {
    fn add(sum: u32, bytes: &[u8]) -> u32 {
        bytes.chunks(2).fold(sum, |sum, pair| {
            sum + u32::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]))
        })
    }
    let length = u32::try_from(message.len()).expect("small");
    let mut sum = add(0, &source.octets());
    sum = add(sum, &destination.octets());
    sum = add(sum, &length.to_be_bytes());
    sum = add(sum, &[0, 0, 0, ICMPV6]);
    sum = add(sum, message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 100);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);

    #[test]
    fn arp_tells_a_probe_an_answer_and_an_announcement_apart() {
        let p = arp_probe(MAC, VIP);
        assert_eq!(&p[6..8], &1u16.to_be_bytes(), "a request");
        assert_eq!(&p[14..18], &[0, 0, 0, 0], "sender IP 0.0.0.0 (RFC 5227)");
        assert_eq!(&p[24..28], &VIP.octets());
        assert_eq!(heard_arp(&arp_probe(OTHER, VIP), VIP, MAC), Some(Heard::Probe));
        // Our own frames say nothing.
        assert_eq!(heard_arp(&p, VIP, MAC), None);
        assert_eq!(heard_arp(&garp(ArpOp::Reply, MAC, VIP), VIP, MAC), None);
        // A live claimer's gratuitous ARP, of either kind.
        assert_eq!(
            heard_arp(&garp(ArpOp::Reply, OTHER, VIP), VIP, MAC),
            Some(Heard::Announce(OTHER))
        );
        assert_eq!(
            heard_arp(&garp(ArpOp::Request, OTHER, VIP), VIP, MAC),
            Some(Heard::Announce(OTHER))
        );
        // A kernel's reply to a probe: from the address, to the prober
        // (0.0.0.0), so not gratuitous.
        let mut reply = garp(ArpOp::Reply, OTHER, VIP);
        reply[18..24].copy_from_slice(&MAC);
        reply[24..28].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(heard_arp(&reply, VIP, MAC), Some(Heard::Answer(OTHER)));
        // Other addresses, and short frames, say nothing.
        assert_eq!(
            heard_arp(&garp(ArpOp::Reply, OTHER, Ipv4Addr::new(198, 18, 7, 1)), VIP, MAC),
            None
        );
        assert_eq!(heard_arp(&[0u8; 10], VIP, MAC), None);
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
    fn an_unsolicited_advertisement_overrides_and_carries_the_mac_and_halos_mark() {
        let na = unsolicited_na(MAC, VIP6);
        assert_eq!(na[0], 136);
        assert_eq!(na[4], 0x20, "override, not solicited, not router");
        assert_eq!(&na[8..24], &VIP6.octets());
        let options = nd_options(&na[24..]);
        assert_eq!(options[0], (2, &MAC[..]));
        assert_eq!(options[1], (ND_OPT_HALO, &HALO_MARK[..]));
        let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
        let packet = ipv6_packet(VIP6, all_nodes, &na);
        assert_eq!(packet.len(), 80);
        assert_eq!(&packet[..8], &[0x60, 0, 0, 0, 0, 40, 58, 255], "ICMPv6, hop limit 255");
        // A correct checksum makes the whole sum come out as zero.
        assert_eq!(icmpv6_checksum(VIP6, all_nodes, &packet[40..]), 0);
        assert_eq!(multicast_mac(all_nodes), [0x33, 0x33, 0, 0, 0, 1]);
    }

    #[test]
    fn a_dad_probe_goes_to_the_solicited_node_group_from_nowhere() {
        let ns = dad_solicitation(VIP6);
        assert_eq!(ns[0], 135);
        assert!(nd_options(&ns[24..]).is_empty(), "no source link-layer address from ::");
        let group = solicited_node(VIP6);
        assert_eq!(group, "ff02::1:ff00:100".parse::<Ipv6Addr>().unwrap());
        assert_eq!(multicast_mac(group), [0x33, 0x33, 0xff, 0, 1, 0]);
        let packet = ipv6_packet(Ipv6Addr::UNSPECIFIED, group, &ns);
        assert_eq!(icmpv6_checksum(Ipv6Addr::UNSPECIFIED, group, &packet[40..]), 0);
    }

    #[test]
    fn neighbour_discovery_tells_a_probe_an_answer_and_an_announcement_apart() {
        // Another halo-lb's advertisement: marked.
        assert_eq!(
            heard_nd(&unsolicited_na(OTHER, VIP6), VIP6, MAC),
            Some(Heard::Announce(OTHER))
        );
        // A kernel's answer to a DAD probe: the same, without the mark.
        let kernel = &unsolicited_na(OTHER, VIP6)[..32];
        assert_eq!(heard_nd(kernel, VIP6, MAC), Some(Heard::Answer(OTHER)));
        // Our own, and advertisements of other addresses: nothing.
        assert_eq!(heard_nd(&unsolicited_na(MAC, VIP6), VIP6, MAC), None);
        let elsewhere = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x11);
        assert_eq!(heard_nd(&unsolicited_na(OTHER, elsewhere), VIP6, MAC), None);
        // A DAD probe, and a neighbour resolving the address (with its own
        // link-layer address): only the first is a probe.
        assert_eq!(heard_nd(&dad_solicitation(VIP6), VIP6, MAC), Some(Heard::Probe));
        assert_eq!(heard_nd(&solicitation(OTHER, VIP6), VIP6, MAC), None);
        // Malformed options end the parse, never loop or panic.
        assert!(nd_options(&[2, 0, 1, 2, 3, 4, 5, 6]).is_empty());
        assert!(nd_options(&[2, 9, 1, 2, 3, 4, 5, 6]).is_empty());
        assert_eq!(heard_nd(&[136; 10], VIP6, MAC), None);
    }

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
