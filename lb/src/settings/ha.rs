//! `[ha]` validated: the pair's lock, this instance's id, the timings
//! derived from the check TTL and the lock delay, the probe address and the
//! floating address.

use std::net::SocketAddr;
use std::time::Duration;

use super::file::{HaConfig, HaMode};

/// Validated `[ha]`, with the timings derived from the check TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaSettings {
    /// The pair's name.
    pub cluster: String,
    /// This instance's name.
    pub id: String,
    /// `id` was not set in the file but derived from the host (see
    /// `default_id`): a reload keeps the id the process runs with rather
    /// than deriving it again (the host name may have changed).
    pub id_is_default: bool,
    /// The check TTL.
    pub check_ttl: Duration,
    /// The session's lock delay.
    pub lock_delay: Duration,
    /// How often the check is heartbeated: a quarter of the TTL.
    pub heartbeat: Duration,
    /// How long before the lock delay could end the active stops serving:
    /// a fifth of the lock delay.
    pub margin: Duration,
    /// The lease one server-confirmed read of the lock earns, from the time
    /// it was sent: `lock_delay - margin`.
    pub lease: Duration,
    /// How often the active confirms its lock: a fifth of the lock delay.
    pub confirm_every: Duration,
    /// Where this instance answers probes (UDP), and how that is chosen.
    pub probe: ProbeListen,
    /// How often a standby probes the active.
    pub probe_interval: Duration,
    /// Unanswered probes in a row that mean the active is gone.
    pub probe_misses: u32,
    /// The floating address and its prefix length, and the interface.
    pub floating: Option<FloatingAddress>,
    /// `mode = "ecmp"`: every instance serves and announces; `None`: the
    /// pair.
    pub ecmp: Option<EcmpSettings>,
}

/// The settings of `mode = "ecmp"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcmpSettings {
    /// The TUN device holding the announced addresses.
    pub interface: String,
    /// How long one server-confirmed read of the membership lets the
    /// instance announce, from the time it was sent.
    pub lease: Duration,
    /// How often the membership is read (confirmed): a fifth of the lease.
    pub confirm_every: Duration,
    /// How long a withdrawn, draining instance keeps accepting.
    pub withdraw_wait: Duration,
    /// At most this many instances announce at once.
    pub max_announcing: Option<u32>,
    /// How many should.
    pub expect_announcing: Option<u32>,
}

/// `ha.announce_interface` unset.
pub(crate) const DEFAULT_ANNOUNCE_INTERFACE: &str = "halo-vips";
/// `ha.announce_lease` unset.
pub(crate) const DEFAULT_ANNOUNCE_LEASE: Duration = Duration::from_secs(3);
/// `ha.withdraw_wait` unset.
pub(crate) const DEFAULT_WITHDRAW_WAIT: Duration = Duration::from_secs(1);

/// Where an instance answers its peers' probes: the address it advertises
/// in the lock's value and its registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeListen {
    /// `ha.probe_listen`, as written.
    Configured(SocketAddr),
    /// Unset, with `admin.listen` on a specific address other than
    /// loopback: the admin address, over UDP.
    Admin(SocketAddr),
    /// Unset, with `admin.listen` on loopback (the secure default, which
    /// the peers on other hosts cannot reach): the node's address as the
    /// local Consul agent advertises it to the cluster, on the admin port,
    /// found at start (`/v1/agent/self`). `admin` is what is left when that
    /// fails.
    AgentAddress {
        /// The admin port, which the probe address shares (over UDP).
        port: u16,
        /// The admin address.
        admin: SocketAddr,
    },
}

impl std::fmt::Display for ProbeListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeListen::Configured(a) => write!(f, "{a} (ha.probe_listen)"),
            ProbeListen::Admin(a) => write!(f, "{a} (the admin address: ha.probe_listen unset)"),
            ProbeListen::AgentAddress { port, .. } => write!(
                f,
                "<the local Consul agent's advertise address>:{port} (ha.probe_listen unset, admin.listen on loopback)"
            ),
        }
    }
}

/// `vip_address` on `vip_interface`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloatingAddress {
    /// The address.
    pub address: std::net::IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// The interface.
    pub interface: String,
}

impl HaSettings {
    /// The KV key that is the pair's lock.
    pub fn lock_key(&self) -> String {
        format!("halo/{}/leader", self.cluster)
    }
}

pub(super) fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The default `ha.id`: `<hostname>-<admin port>-<network namespace
/// inode, hex>`. Two containers may share a hostname and an admin port,
/// never a network namespace, so the id is unique per host; it is stable
/// across restarts of the process in one namespace. At most 64 characters
/// (the hostname part is cut). Set `ha.id` for a readable name.
pub(super) fn default_id(host: &str, port: u16, netns: Option<u64>) -> String {
    let suffix = match netns {
        Some(inode) => format!("-{port}-{inode:x}"),
        None => format!("-{port}"),
    };
    let host: String = host.chars().take(64 - suffix.len()).collect();
    format!("{host}{suffix}")
}

/// This process's network namespace inode, from `/proc/self/ns/net`
/// (`net:[4026531992]`).
fn netns_inode() -> Option<u64> {
    let link = std::fs::read_link("/proc/self/ns/net").ok()?;
    let text = link.to_str()?;
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Checks `[ha]`; pushes each problem and returns the settings if there are
/// none. The Consul address it needs is checked with the rest of `[consul]`.
pub(super) fn validate_ha(ha: &HaConfig, admin: Option<SocketAddr>, problems: &mut Vec<String>) -> Option<HaSettings> {
    let before = problems.len();
    if !is_name(&ha.cluster) {
        problems.push(format!(
            "ha.cluster: {:?} must be 1 to 64 letters, digits, '-', '_', '.'",
            ha.cluster
        ));
    }
    let id = match &ha.id {
        Some(id) => id.clone(),
        None => default_id(&halo_health::host_name(), admin.map_or(0, |a| a.port()), netns_inode()),
    };
    if !is_name(&id) {
        problems.push(format!("ha.id: {id:?} must be 1 to 64 letters, digits, '-', '_', '.'"));
    }
    if ha.check_ttl < Duration::from_millis(200) || ha.check_ttl > Duration::from_secs(60) {
        problems.push(format!(
            "ha.check_ttl: {} must be between 200ms and 60s",
            halo_consul::duration::format(ha.check_ttl)
        ));
    }
    if ha.lock_delay > Duration::from_secs(60) {
        problems.push("ha.lock_delay: Consul caps the lock delay at 60s".to_owned());
    } else if ha.lock_delay < Duration::from_millis(100) {
        problems.push(format!(
            "ha.lock_delay: {} is below 100ms: it is also the active's lease, which must outlast a few reads of Consul",
            halo_consul::duration::format(ha.lock_delay)
        ));
    }
    let margin = ha.lock_delay / 5;
    if ha.probe_interval < Duration::from_millis(10) || ha.probe_interval > Duration::from_secs(10) {
        problems.push(format!(
            "ha.probe_interval: {} must be between 10ms and 10s",
            halo_consul::duration::format(ha.probe_interval)
        ));
    }
    if !(1..=100).contains(&ha.probe_misses) {
        problems.push(format!(
            "ha.probe_misses: {} must be between 1 and 100",
            ha.probe_misses
        ));
    }
    let probe = match &ha.probe_listen {
        None => admin.map(|a| {
            if a.ip().is_loopback() {
                ProbeListen::AgentAddress {
                    port: a.port(),
                    admin: a,
                }
            } else {
                ProbeListen::Admin(a)
            }
        }),
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => {
                problems.push(format!(
                    "ha.probe_listen: {a} is advertised to the peers; use a specific ip, not a wildcard"
                ));
                None
            }
            Ok(a) => Some(ProbeListen::Configured(a)),
            Err(_) => {
                problems.push(format!("ha.probe_listen: {text:?} is not an ip:port address"));
                None
            }
        },
    };
    if admin.is_some_and(|a| a.ip().is_unspecified()) {
        problems.push(
            "admin.listen: an HA instance advertises its admin address to its peer; use a specific ip, not 0.0.0.0"
                .to_owned(),
        );
    }
    let floating = match (&ha.vip_address, &ha.vip_interface) {
        (None, None) => None,
        (Some(_), None) => {
            problems.push("ha.vip_interface: required with vip_address".to_owned());
            None
        }
        (None, Some(_)) => {
            problems.push("ha.vip_address: required with vip_interface".to_owned());
            None
        }
        (Some(address), Some(interface)) => {
            let parsed = parse_cidr(address);
            if parsed.is_none() {
                problems.push(format!(
                    "ha.vip_address: {address:?} is not an address with an optional prefix length (198.18.0.100/24)"
                ));
            }
            if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
                problems.push(format!("ha.vip_interface: {interface:?} is not an interface name"));
            }
            parsed.map(|(address, prefix)| FloatingAddress {
                address,
                prefix,
                interface: interface.clone(),
            })
        }
    };
    let ecmp = match ha.mode {
        HaMode::Pair => {
            for (field, set) in [
                ("announce_interface", ha.announce_interface.is_some()),
                ("announce_lease", ha.announce_lease.is_some()),
                ("withdraw_wait", ha.withdraw_wait.is_some()),
                ("max_announcing", ha.max_announcing.is_some()),
                ("expect_announcing", ha.expect_announcing.is_some()),
            ] {
                if set {
                    problems.push(format!("ha.{field}: only for mode = \"ecmp\" (this is a pair)"));
                }
            }
            None
        }
        HaMode::Ecmp => validate_ecmp(ha, problems),
    };
    let probe = probe?;
    (problems.len() == before).then(|| HaSettings {
        cluster: ha.cluster.clone(),
        id,
        id_is_default: ha.id.is_none(),
        check_ttl: ha.check_ttl,
        lock_delay: ha.lock_delay,
        heartbeat: ha.check_ttl / 4,
        margin,
        lease: ha.lock_delay - margin,
        confirm_every: ha.lock_delay / 5,
        probe,
        probe_interval: ha.probe_interval,
        probe_misses: ha.probe_misses,
        floating,
        ecmp,
    })
}

/// Checks the `mode = "ecmp"` fields, and refuses the pair's floating
/// address and probe address, which mean nothing there.
fn validate_ecmp(ha: &HaConfig, problems: &mut Vec<String>) -> Option<EcmpSettings> {
    let before = problems.len();
    for (field, set) in [
        ("vip_address", ha.vip_address.is_some()),
        ("vip_interface", ha.vip_interface.is_some()),
        ("probe_listen", ha.probe_listen.is_some()),
    ] {
        if set {
            problems.push(format!(
                "ha.{field}: only for a pair; with mode = \"ecmp\" every instance announces the VIP addresses (announce_interface)"
            ));
        }
    }
    let interface = ha
        .announce_interface
        .clone()
        .unwrap_or_else(|| DEFAULT_ANNOUNCE_INTERFACE.to_owned());
    if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ', ':']) {
        problems.push(format!(
            "ha.announce_interface: {interface:?} is not an interface name (1 to 15 characters, no '/', ':' or spaces)"
        ));
    }
    let lease = ha.announce_lease.unwrap_or(DEFAULT_ANNOUNCE_LEASE);
    if lease < Duration::from_millis(500) || lease > Duration::from_secs(60) {
        problems.push(format!(
            "ha.announce_lease: {} must be between 500ms and 60s",
            halo_consul::duration::format(lease)
        ));
    }
    let withdraw_wait = ha.withdraw_wait.unwrap_or(DEFAULT_WITHDRAW_WAIT);
    if withdraw_wait > Duration::from_secs(30) {
        problems.push(format!(
            "ha.withdraw_wait: {} is over 30s",
            halo_consul::duration::format(withdraw_wait)
        ));
    }
    if ha.max_announcing == Some(0) {
        problems.push("ha.max_announcing: 0 would announce from no instance; unset it for no cap".to_owned());
    }
    if ha.expect_announcing == Some(0) {
        problems.push("ha.expect_announcing: 0 expects nothing; unset it".to_owned());
    }
    if let (Some(cap), Some(expect)) = (ha.max_announcing, ha.expect_announcing) {
        if expect > cap {
            problems.push(format!(
                "ha.expect_announcing: {expect} is more than max_announcing ({cap}) lets announce"
            ));
        }
    }
    (problems.len() == before).then(|| EcmpSettings {
        interface,
        lease,
        confirm_every: lease / 5,
        withdraw_wait,
        max_announcing: ha.max_announcing,
        expect_announcing: ha.expect_announcing.or(ha.max_announcing),
    })
}

/// `ip` or `ip/prefix`.
fn parse_cidr(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (s, None),
    };
    let ip: std::net::IpAddr = ip.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
        None => max,
    };
    Some((ip, prefix))
}
