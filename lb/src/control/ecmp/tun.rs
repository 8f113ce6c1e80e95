//! The announce interface: a TUN device that halo-lb creates, holds the
//! announced VIP addresses on, and that the kernel deletes when the process
//! ends, however it ends.
//!
//! The routing daemon on the host exports the host routes of this
//! interface's addresses to the routers (BIRD: `protocol direct`), so
//! adding an address announces the VIP and removing it withdraws it. The
//! device is created without `IFF_PERSIST`: it exists only while halo-lb
//! holds its file descriptor, so a `kill -9`, a panic or an OOM kill
//! deletes the device, its addresses go with it, and the daemon withdraws
//! every route in the same instant (8 ms to the router's table measured in
//! the testbed), long before BFD or a BGP hold timer would notice anything.
//! A persistent device of the same name (left by someone else) is refused
//! at start: it would outlive us and keep announcing for a dead process.
//!
//! The addresses are added with `IFA_F_NODAD` (IPv6) and as /32 or /128, so
//! the kernel also takes them as local addresses: the VIP's listeners (bound
//! with `IP_FREEBIND` from the start) receive what the routers send to them.
//! Nothing is ever read from or written to the device itself.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use crate::control::floating::Netlink;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_PERSIST: libc::c_short = 0x0800;

/// Why the announce interface cannot be made or changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The process lacks CAP_NET_ADMIN.
    #[error("ha.announce_interface {interface}: creating a TUN device and adding addresses needs CAP_NET_ADMIN (run as root or grant the capability)")]
    MissingCapability {
        /// The interface.
        interface: String,
    },
    /// Another process holds the device, or it is not a TUN device.
    #[error("ha.announce_interface {interface}: {why}")]
    InUse {
        /// The interface.
        interface: String,
        /// What is in the way.
        why: String,
    },
    /// Any other failure, with the kernel's error.
    #[error("ha.announce_interface {interface}: cannot {action}: {source}")]
    Io {
        /// The interface.
        interface: String,
        /// What failed.
        action: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// The device and the addresses on it.
#[derive(Debug)]
pub(crate) struct Announcer {
    /// Holding this keeps the device; closing it deletes it.
    _device: File,
    name: String,
    index: u32,
    netlink: Netlink,
    announced: BTreeSet<IpAddr>,
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (in a
/// union padded to 24 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Issues a TUN ioctl that reads and writes a `struct ifreq`.
#[allow(unsafe_code)]
fn tun_ioctl(device: &File, request: libc::c_ulong, ifreq: &mut IfReq) -> io::Result<()> {
    // SAFETY: TUNSETIFF and TUNGETIFF read and write one `struct ifreq`
    // (40 bytes: IfReq's layout) at the pointer, which is valid and
    // exclusively borrowed for the call.
    let result = unsafe { libc::ioctl(device.as_raw_fd(), request, std::ptr::from_mut(ifreq)) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Announcer {
    /// Creates the device (or attaches to a non-persistent one nobody
    /// holds, which cannot exist for long) and sets it up, with no address.
    pub(crate) fn open(name: &str) -> Result<Announcer, Error> {
        let io_error = |action: &str, source: io::Error| {
            if source.raw_os_error() == Some(libc::EPERM) {
                Error::MissingCapability {
                    interface: name.to_owned(),
                }
            } else {
                Error::Io {
                    interface: name.to_owned(),
                    action: action.to_owned(),
                    source,
                }
            }
        };
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| io_error("open /dev/net/tun", e))?;
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        if name.len() >= libc::IFNAMSIZ {
            return Err(Error::InUse {
                interface: name.to_owned(),
                why: "the name is too long".to_owned(),
            });
        }
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Err(error) = tun_ioctl(&device, TUNSETIFF, &mut request) {
            return Err(match error.raw_os_error() {
                Some(libc::EBUSY) | Some(libc::EINVAL) => Error::InUse {
                    interface: name.to_owned(),
                    why: "an interface of that name exists and is not a free TUN device (another halo-lb holds it, or it is another kind of link)".to_owned(),
                },
                _ => io_error("create the TUN device", error),
            });
        }
        tun_ioctl(&device, TUNGETIFF, &mut request).map_err(|e| io_error("read the TUN device's flags", e))?;
        if request.flags & IFF_PERSIST != 0 {
            return Err(Error::InUse {
                interface: name.to_owned(),
                why: "it is a persistent TUN device, which would keep announcing after halo-lb died; remove it (ip link del) and let halo-lb create its own".to_owned(),
            });
        }
        let mut netlink = Netlink::open().map_err(|e| Error::Io {
            interface: name.to_owned(),
            action: "open a netlink socket".to_owned(),
            source: io::Error::other(e.to_string()),
        })?;
        let index = netlink.index(name).map_err(|e| io_error("look the device up", e))?;
        netlink.set_up(index).map_err(|e| io_error("set the device up", e))?;
        Ok(Announcer {
            _device: device,
            name: name.to_owned(),
            index,
            netlink,
            announced: BTreeSet::new(),
        })
    }

    /// The addresses announced now.
    pub(crate) fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announced
    }

    /// Makes the announced set exactly `wanted`: withdraws first, then
    /// announces. Returns what changed; stops at the first failure (the set
    /// then says what is on the device).
    pub(crate) fn set(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<Changed, Error> {
        let mut changed = Changed::default();
        let gone: Vec<IpAddr> = self.announced.difference(wanted).copied().collect();
        for address in gone {
            self.change(address, false)?;
            changed.withdrawn.push(address);
        }
        let new: Vec<IpAddr> = wanted.difference(&self.announced).copied().collect();
        for address in new {
            self.change(address, true)?;
            changed.announced.push(address);
        }
        Ok(changed)
    }

    /// Withdraws every address but keeps each one local to this host (a
    /// `local` route on the device, which the routing daemon does not
    /// export), so the connections a draining instance still carries,
    /// whose packets its peers hand over (see [`super::handoff`]), keep
    /// arriving. The routes go with the device. Returns what was withdrawn.
    pub(crate) fn withdraw_keeping_local(&mut self) -> Result<Vec<IpAddr>, Error> {
        let addresses: Vec<IpAddr> = self.announced.iter().copied().collect();
        // Every address first, then every route: removing an address takes
        // the kernel's own local route for it, and removing the device's
        // last IPv4 address flushes every route through the device, ours
        // too. For the microseconds between the two steps a packet to an
        // address is dropped, and TCP sends it again.
        for &address in &addresses {
            self.change(address, false)?;
        }
        for &address in &addresses {
            self.netlink
                .change_local_route(self.index, address, true)
                .map_err(|source| Error::Io {
                    interface: self.name.clone(),
                    action: format!("keep {address} local"),
                    source,
                })?;
        }
        Ok(addresses)
    }

    fn change(&mut self, address: IpAddr, add: bool) -> Result<(), Error> {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        self.netlink
            .change_address(self.index, address, prefix, add)
            .map_err(|source| {
                if source.raw_os_error() == Some(libc::EPERM) {
                    Error::MissingCapability {
                        interface: self.name.clone(),
                    }
                } else {
                    Error::Io {
                        interface: self.name.clone(),
                        action: format!("{} {address}", if add { "add" } else { "remove" }),
                        source,
                    }
                }
            })?;
        if add {
            self.announced.insert(address);
        } else {
            self.announced.remove(&address);
        }
        Ok(())
    }
}

/// What one [`Announcer::set`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changed {
    /// Addresses added.
    pub(crate) announced: Vec<IpAddr>,
    /// Addresses removed.
    pub(crate) withdrawn: Vec<IpAddr>,
}

impl Changed {
    /// Nothing changed.
    pub(crate) fn is_empty(&self) -> bool {
        self.announced.is_empty() && self.withdrawn.is_empty()
    }
}
