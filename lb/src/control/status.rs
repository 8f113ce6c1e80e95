//! The `/status` document, typed: the one place its shape is defined.
//!
//! `GET /status` serializes a [`Status`]; a client (or a test) can
//! deserialize the same types. Times are Unix seconds unless a field's name
//! says otherwise (`_ms`, `_us`); addresses are `ip:port` strings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::balance::backend::{BackendState, Health};
use crate::balance::spread;
pub use crate::balance::spread::Spread;
use crate::balance::table::Vip;
pub use crate::balance::zone::{Routing, ZoneStatus};
use crate::dataplane::udp;
use crate::settings::{Algorithm, CopyMode, Protocol, ProxyProtocol};
pub use crate::sources::{SourceStatus, Watched};

/// The whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// A drain (SIGTERM) is under way.
    pub draining: bool,
    /// The VIPs have listeners: always for a lone balancer, only while
    /// active for one of an HA pair.
    pub serving: bool,
    /// The admin address.
    pub admin: String,
    /// The data plane the workers run: `io_uring`, `epoll`, or
    /// `io_uring+epoll` (some io_uring workers could not start).
    #[serde(default)]
    pub data_plane: String,
    /// Every configured VIP, by name.
    pub vips: Vec<VipStatus>,
    /// The election, for a balancer with `[ha]` (a pair); `null` without.
    pub ha: Option<HaStatus>,
    /// The cluster's membership and this instance's announcements, with
    /// `ha.mode = "ecmp"`; `null` otherwise.
    #[serde(default)]
    pub ecmp: Option<EcmpStatus>,
}

/// An ECMP cluster, as this instance sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EcmpStatus {
    /// The cluster's name.
    pub cluster: String,
    /// This instance's `ha.id`.
    pub id: String,
    /// This process (random, new with every start).
    pub instance: String,
    /// What this instance does now.
    pub state: MemberState,
    /// The VIP addresses it announces now.
    pub announced: Vec<String>,
    /// Why it announces nothing, or not every VIP address.
    pub withheld: Option<String>,
    /// The interface holding the announced addresses.
    pub interface: String,
    /// Its Consul session, while it has one.
    pub session: Option<String>,
    /// Milliseconds of announcing lease left.
    pub lease_remaining_ms: Option<u64>,
    /// `ha.announce_lease` in milliseconds.
    pub lease_ms: u64,
    /// `ha.max_announcing`.
    pub max_announcing: Option<u32>,
    /// `ha.expect_announcing` (or `max_announcing`).
    pub expect_announcing: Option<u32>,
    /// The members as the last confirmed read of Consul listed them,
    /// longest-standing first.
    pub members: Vec<EcmpMember>,
    /// The last Consul error, while the membership cannot be read.
    pub consul_error: Option<String>,
    /// Another live process holds this instance's membership key (the same
    /// `ha.cluster` and `ha.id`): this one stays out.
    pub id_conflict: Option<String>,
    /// The address its peers hand a draining instance's packets to (the
    /// one its Consul agent advertises), once known.
    #[serde(default)]
    pub address: Option<String>,
    /// The draining member this instance hands over packets of connections
    /// it does not know to, while one drains.
    #[serde(default)]
    pub handoff_to: Option<String>,
    /// Why this instance cannot hand over (no `nft`, say), if it cannot.
    #[serde(default)]
    pub handoff_off: Option<String>,
    /// Its recent announcements and withdrawals, oldest first, on its own
    /// clock.
    pub changes: Vec<AnnounceChange>,
}

/// One member of an ECMP cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcmpMember {
    /// Its `ha.id`.
    pub id: String,
    /// Its process.
    pub instance: String,
    /// Its admin address.
    pub admin: String,
    /// What it said it does.
    pub state: MemberState,
    /// When it said so (RFC 3339).
    pub since: String,
    /// Its address for the handoff of a drain.
    #[serde(default)]
    pub address: Option<String>,
    /// The draining member it hands over to (its instance), if any.
    #[serde(default)]
    pub handoff: Option<String>,
}

/// What a member of an ECMP cluster does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Serving but announcing nothing: not ready (no lease, no listener, no
    /// backend), or a hot spare beyond `max_announcing`.
    Ready,
    /// Announcing at least one VIP address.
    Announcing,
    /// Withdrawn for shutdown; finishing its connections.
    Draining,
}

impl MemberState {
    /// The name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Ready => "ready",
            MemberState::Announcing => "announcing",
            MemberState::Draining => "draining",
        }
    }
}

/// One change of what an ECMP instance announces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceChange {
    /// When (RFC 3339).
    pub at: String,
    /// When, in microseconds since the Unix epoch.
    pub at_unix_us: u64,
    /// Addresses announced.
    pub announced: Vec<String>,
    /// Addresses withdrawn.
    pub withdrawn: Vec<String>,
    /// Why: `ready`, `lease_expired`, `membership_lost`, `not_ready`,
    /// `over_cap`, `drain`, or `listeners_closed` (a drain's listeners
    /// closing after the withdrawal, with no address of its own).
    pub reason: String,
}

/// One VIP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    /// Its name.
    pub name: String,
    /// Its listen address.
    pub listen: String,
    /// Whether its listener is bound and accepting.
    pub listening: bool,
    /// `tcp` or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// The balancing algorithm.
    pub algorithm: Algorithm,
    /// The copy strategy.
    pub copy: CopyMode,
    /// The PROXY protocol header sent.
    pub proxy_protocol: ProxyProtocol,
    /// Its live connection limit.
    pub max_connections: usize,
    /// Live client connections.
    pub active_connections: usize,
    /// The published table's version (one more per swap).
    pub table_version: u64,
    /// Why the last table rebuild failed (the previous table keeps
    /// serving); `None` when it succeeded.
    pub table_error: Option<String>,
    /// Its discovery (Consul or DNS); `None` for static backends.
    pub discovery: Option<SourceStatus>,
    /// Zone-aware routing, when the balancer has a `zone`.
    pub zone: Option<ZoneStatus>,
    /// Over how many zones, regions and racks the healthy backends are
    /// spread, now.
    #[serde(default)]
    pub spread: Spread,
    /// UDP VIPs: flows, datagrams and drops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpStatus>,
    /// Every backend of the published table.
    pub backends: Vec<BackendStatus>,
}

/// A UDP VIP's flows and datagrams since the process started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpStatus {
    /// The flow idle timeout, milliseconds.
    pub idle_timeout_ms: u64,
    /// Replies per datagram that end a flow; `None`: flows end when idle.
    pub responses: Option<u32>,
    /// Live flows.
    pub flows_active: u64,
    /// Flows opened.
    pub flows_created: u64,
    /// Flows ended, by how: `expired` (idle), `answered` (`udp_responses`
    /// reached), `evicted` (at the flow limit), `failed` (ICMP error from
    /// the backend), `closed` (the VIP stopped being served).
    pub flows_ended: BTreeMap<String, u64>,
    /// Datagrams from clients forwarded to backends.
    pub datagrams_in: u64,
    /// Datagrams from backends forwarded to clients.
    pub datagrams_out: u64,
    /// Datagrams dropped, by reason: `not_serving`, `flow_limit`,
    /// `no_backend`, `local_resources`, `backend_busy`, `backend_error`,
    /// `too_large`, `reply_error`.
    pub drops: BTreeMap<String, u64>,
}

/// A backend's UDP traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendUdp {
    /// Datagrams sent to it.
    pub datagrams_in: u64,
    /// Bytes sent to it.
    pub bytes_in: u64,
    /// Datagrams it sent back.
    pub datagrams_out: u64,
    /// Bytes it sent back.
    pub bytes_out: u64,
}

/// One backend of a VIP's table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// `ip:port`.
    pub address: String,
    /// Its weight.
    pub weight: u32,
    /// Its zone, if known.
    pub zone: Option<String>,
    /// Its region, if known.
    #[serde(default)]
    pub region: Option<String>,
    /// Its rack, if known.
    #[serde(default)]
    pub rack: Option<String>,
    /// Whether (and why not) it is picked.
    pub state: BackendHealth,
    /// Milliseconds of passive ejection left (0: not ejected).
    pub ejected_for_ms: u64,
    /// Live connections to it.
    pub active_connections: usize,
    /// Its active check, when the VIP has `[vip.check]`.
    pub check: Option<CheckStatus>,
    /// Its datagrams, on a UDP VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<BackendUdp>,
}

/// Whether a backend is picked, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendHealth {
    /// Picked.
    Healthy,
    /// Passively ejected after failed connects, for `ejected_for_ms`.
    Ejected,
    /// Disabled by an operator: listed, never picked.
    Disabled,
    /// Failing the balancer's active check.
    CheckFailing,
}

/// A backend's active check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckStatus {
    /// `passing`, `warning` or `critical` (critical: not picked).
    pub status: halo_health::Status,
    /// What the most recent check saw.
    pub output: String,
    /// Unix seconds of the last flip (or of the start).
    pub since: u64,
    /// Checks run so far.
    pub probes: u64,
}

/// The election, as this instance sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HaStatus {
    /// The pair's name.
    pub cluster: String,
    /// This instance's `ha.id`.
    pub id: String,
    /// This process (random, new with every start).
    pub instance: String,
    /// Its role now.
    pub role: Role,
    /// The fencing epoch (the lock's LockIndex) of its current or last
    /// term; `None` before its first.
    pub epoch: Option<u64>,
    /// The holder of the lock, as last read; `None` when nobody holds it.
    pub leader: Option<LeaderStatus>,
    /// Its Consul session, while it has one.
    pub session: Option<String>,
    /// Milliseconds of serving lease left, while it holds one.
    pub lease_remaining_ms: Option<u64>,
    /// `ha.check_ttl` in milliseconds.
    pub check_ttl_ms: u64,
    /// `ha.lock_delay` in milliseconds.
    pub lock_delay_ms: u64,
    /// Where it answers probes (UDP `ip:port`; empty until chosen at
    /// start).
    pub probe: String,
    /// Why that address (`ha.probe_listen`, the admin address, or the
    /// address the local Consul agent advertises for this node).
    #[serde(default)]
    pub probe_reason: String,
    /// This instance's Consul node, as its agent names it.
    #[serde(default)]
    pub node: Option<String>,
    /// The standby's failure detector.
    pub detector: DetectorStatus,
    /// Other hosts that have the floating address (they answer ARP or
    /// neighbour solicitations for it, or announce it) while this instance
    /// holds the lock: the leftover of a killed predecessor, or another
    /// live claimer (see [`VipConflict::yielded`]).
    pub vip_conflict: Option<VipConflict>,
    /// The last Consul error, while the election cannot reach Consul.
    pub consul_error: Option<String>,
    /// An older live instance uses the same `ha.id`: this one stays out.
    pub id_conflict: Option<String>,
    /// Its recent terms as active, oldest first, on its own clock.
    pub terms: Vec<Term>,
}

/// Who holds the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderStatus {
    /// The holder's `ha.id`.
    pub id: Option<String>,
    /// The holder's admin address.
    pub admin: Option<String>,
    /// The holder's process.
    pub instance: Option<String>,
    /// The lock's LockIndex.
    pub epoch: u64,
}

/// What the failure detector saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetectorStatus {
    /// The probe address of the instance being watched.
    pub peer: Option<String>,
    /// Forced takeovers this process made.
    pub forced_takeovers: u64,
    /// Why the last one was made.
    pub last_evidence: Option<String>,
    /// Forced takeovers held back by damping.
    pub damped: u64,
    /// Milliseconds of damping left, while damped.
    #[serde(default)]
    pub damped_for_ms: Option<u64>,
    /// Damped until the active answers a probe (the link to it works
    /// again), however long the window.
    #[serde(default)]
    pub damped_until_heard: bool,
    /// Why the holder of the lock cannot be probed, when it cannot (this
    /// instance relies on Consul's detection meanwhile).
    #[serde(default)]
    pub unwatchable: Option<String>,
}

/// Other answers for the floating address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipConflict {
    /// Their MAC addresses.
    pub macs: Vec<String>,
    /// When they were first seen (RFC 3339).
    pub since: String,
    /// Those of them that announce the address, i.e. live claimers (another
    /// halo-lb, of another cluster configured with the same address), not
    /// just the leftover of a dead one. Empty in documents of older
    /// versions.
    #[serde(default)]
    pub live: Vec<String>,
    /// This instance holds its cluster's lock but serves nothing and has
    /// not claimed the address, because a live claimer has it (see the
    /// election's module docs for who gives way). It claims the address
    /// once nobody announces it any more.
    #[serde(default)]
    pub yielded: bool,
}

// The election's vocabulary: the election (`control::ha`) uses these
// types, and the document shows them as they are.

/// An instance's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Not yet registered with a valid session, or out of the election.
    Starting,
    /// Warm: tables and discovery run, listeners are closed.
    Standby,
    /// Holds the lock under a valid lease and serves the VIPs.
    Active,
    /// Holds the lock but could not confirm it with the servers in time:
    /// serves nothing until a confirming read succeeds.
    Suspended,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Standby => "standby",
            Role::Active => "active",
            Role::Suspended => "suspended",
        }
    }
}

/// Why an active stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepDown {
    /// No read of the lock was confirmed by the servers in time.
    LeaseExpired,
    /// The session is gone.
    SessionLost,
    /// The key shows another session, or none.
    LockLost,
    /// A VIP could not be bound: the promotion was undone.
    BindFailed,
    /// Another live host claims the floating address and wins the
    /// tie-break (see `vip_conflict`): this instance gave it way.
    VipYielded,
    /// The process is shutting down and handed the lock over.
    Shutdown,
}

impl StepDown {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StepDown::LeaseExpired => "lease_expired",
            StepDown::SessionLost => "session_lost",
            StepDown::LockLost => "lock_lost",
            StepDown::BindFailed => "bind_failed",
            StepDown::VipYielded => "vip_yielded",
            StepDown::Shutdown => "shutdown",
        }
    }
}

/// One period as active, on this process's own clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    /// The fencing epoch (the key's LockIndex).
    pub epoch: u64,
    /// Wall-clock microseconds since the epoch, taken just before the
    /// listeners were bound (so the real serving time lies inside).
    pub from_unix_us: u64,
    /// Taken just after the listeners were shut; `None` while still active.
    pub to_unix_us: Option<u64>,
    /// Why the term ended.
    pub ended_by: Option<StepDown>,
}

/// A VIP's part of the document. `listen`, `listening` and `discovery`
/// come from the server's registry; the rest from the published table.
pub(crate) fn vip_status(
    vip: &Vip,
    listen: SocketAddr,
    listening: bool,
    discovery: Option<SourceStatus>,
    udp: Option<&udp::Stats>,
) -> VipStatus {
    let now = Vip::now();
    let table = vip.table();
    let protocol = if udp.is_some() { Protocol::Udp } else { Protocol::Tcp };
    let backends = table
        .entries
        .iter()
        .map(|e| {
            let (health, remaining) = e.state.health(now);
            let state = if e.disabled {
                BackendHealth::Disabled
            } else if e.state.check_failing() {
                BackendHealth::CheckFailing
            } else {
                match health {
                    Health::Healthy => BackendHealth::Healthy,
                    Health::Ejected => BackendHealth::Ejected,
                }
            };
            BackendStatus {
                address: e.backend.addr.to_string(),
                weight: e.backend.weight,
                zone: e.backend.zone.clone(),
                region: e.backend.region.clone(),
                rack: e.backend.rack.clone(),
                state,
                ejected_for_ms: u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
                active_connections: e.state.active(),
                check: check_status(&e.state),
                udp: udp.map(|_| {
                    let c = e.state.counters();
                    BackendUdp {
                        datagrams_in: c.datagrams_in,
                        bytes_in: c.bytes_in,
                        datagrams_out: c.datagrams_out,
                        bytes_out: c.bytes_out,
                    }
                }),
            }
        })
        .collect();
    let udp = udp.map(|stats| {
        let s = stats.snapshot();
        let owned = |m: BTreeMap<&'static str, u64>| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        UdpStatus {
            idle_timeout_ms: u64::try_from(table.settings.udp.idle_timeout.as_millis()).unwrap_or(u64::MAX),
            responses: table.settings.udp.responses,
            flows_active: s.flows_active,
            flows_created: s.flows_created,
            flows_ended: owned(s.flows_ended),
            datagrams_in: s.datagrams_in,
            datagrams_out: s.datagrams_out,
            drops: owned(s.drops),
        }
    });
    VipStatus {
        name: vip.name().to_owned(),
        listen: listen.to_string(),
        listening,
        protocol,
        algorithm: table.settings.algorithm,
        copy: table.settings.copy,
        proxy_protocol: table.settings.proxy_protocol,
        max_connections: table.settings.max_connections,
        active_connections: vip.active(),
        table_version: table.version,
        table_error: vip.build_error(),
        discovery,
        zone: table.zone_status(now),
        spread: spread::spread(&table.entries, now),
        udp,
        backends,
    }
}

/// The active check of a backend, if one runs.
fn check_status(state: &BackendState) -> Option<CheckStatus> {
    state.check().map(|handle| {
        let s = handle.state();
        CheckStatus {
            status: s.status,
            output: s.output,
            since: s
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            probes: s.probes,
        }
    })
}
