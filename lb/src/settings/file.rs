//! The file as written: the TOML schema, its defaults, and nothing
//! validated yet. Every type here is what serde reads; `validate` turns
//! them into the plain settings the rest of the balancer uses.

use std::fmt;
use std::time::Duration;

use halo_consul::duration::serde_str as go_duration;
use serde::Deserialize;

/// Default longest wait of one Consul blocking query.
pub const DEFAULT_CONSUL_WAIT: Duration = Duration::from_secs(60);
/// Default admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Default time a new backend connection may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time a proxied connection may sit with no bytes either way.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A UDP flow with no datagram either way for this long ends (its upstream
/// socket is closed; the client's next datagram starts a new flow, which
/// Maglev sends to the same backend while the backend set is the same).
///
/// 60 s, as Envoy's UDP proxy: longer than the idle timeout QUIC stacks
/// negotiate by default (30 s), so a QUIC connection ends on its own terms,
/// and than the keepalive interval of streaming senders (syslog, statsd,
/// game and media traffic keep NAT mappings alive at 15 to 30 s); short
/// enough that the descriptors of gone clients come back within a minute.
/// Request/response protocols (DNS) end their flows sooner with
/// `udp_responses`.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default per-VIP connection limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default extra backends tried after a failed connect.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default listen backlog.
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Default time live connections get to finish on SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default consecutive connect failures that eject a backend.
pub const DEFAULT_EJECT_AFTER: u32 = 2;
/// Default first ejection time; it doubles on each consecutive ejection.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(1);
/// Default longest ejection time.
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(60);
/// Default backend weight.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Default HA pair name.
pub const DEFAULT_HA_CLUSTER: &str = "default";
/// Default TTL of an HA instance's check.
pub const DEFAULT_CHECK_TTL: Duration = Duration::from_secs(1);
/// Default lock delay of an HA instance's session.
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_millis(300);
/// Default time between two probes of the active by a standby.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Default probes in a row without an answer after which a standby judges
/// the active gone.
pub const DEFAULT_PROBE_MISSES: u32 = 3;
/// Default fraction of local-zone backends that must be healthy for a VIP
/// to route within the balancer's zone: about 1/1.4, Envoy's default
/// overprovisioning factor (a zone at 70 % can carry its own load with the
/// usual headroom).
pub const DEFAULT_ZONE_MIN_HEALTHY: f64 = 0.7;
/// Default DNS server for `dns` discovery: a local Consul agent's DNS
/// interface.
pub const DEFAULT_DNS_SERVER: &str = "127.0.0.1:8600";
/// Default time between two DNS lookups.
pub const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(5);
/// Default deadline of one DNS lookup.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time between two active checks of a backend.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Default deadline of one active check.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default passing checks in a row that bring a down backend back.
pub const DEFAULT_CHECK_RISE: u32 = 2;
/// Default failing checks in a row that take an up backend out.
pub const DEFAULT_CHECK_FALL: u32 = 3;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The admin HTTP listener. Unset: [`DEFAULT_ADMIN_LISTEN`].
    #[serde(default)]
    pub admin: AdminConfig,
    /// How long live connections may take to finish on SIGTERM. Unset:
    /// [`DEFAULT_DRAIN_TIMEOUT`].
    #[serde(default = "default_drain_timeout", with = "go_duration")]
    pub drain_timeout: Duration,
    /// Data-plane threads, each a single-threaded runtime serving its own
    /// connections. Unset: one per core.
    #[serde(default)]
    pub workers: Option<usize>,
    /// How the workers drive their sockets: `auto` (io_uring where the
    /// kernel and the sandbox allow it, else epoll), `io_uring` or `epoll`.
    #[serde(default)]
    pub data_plane: DataPlane,
    /// How to reach Consul, for VIPs with `service`.
    #[serde(default)]
    pub consul: ConsulConfig,
    /// The virtual IPs to serve (`[[vip]]` tables).
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipConfig>,
    /// The zone (fault domain) this balancer runs in, compared with each
    /// backend's `zone`. Set: every VIP routes zone-aware (see
    /// `zone_min_healthy`). Unset: zone-aware routing is off and backends of
    /// every zone are used alike.
    #[serde(default)]
    pub zone: Option<String>,
    /// Run as one of an active/standby pair. Unset: serve alone, always.
    #[serde(default)]
    pub ha: Option<HaConfig>,
}

/// `[ha]`: one of an active/standby pair elected through a Consul lock.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// How the instances of the cluster share the VIPs. `"pair"` (the
    /// default): one active at a time, elected through a Consul lock, the
    /// others warm standbys. `"ecmp"`: every healthy instance serves the
    /// VIPs at once and announces their addresses to the routers (through a
    /// routing daemon that exports `announce_interface`), which spread flows
    /// over the instances with ECMP.
    #[serde(default)]
    pub mode: HaMode,
    /// ecmp: the interface halo-lb creates and holds each VIP address on
    /// (as a /32 or /128) while it announces it: a TUN device that lives
    /// exactly as long as the process, so a crash withdraws every route at
    /// once. The routing daemon exports this interface's addresses. Unset:
    /// "halo-vips".
    pub announce_interface: Option<String>,
    /// ecmp: how long an instance keeps announcing after the last read of
    /// its membership that the Consul servers confirmed (the same lease as
    /// the pair's: an instance cut off from Consul withdraws within it).
    /// Confirmed five times per lease. 500 ms to 60 s. Unset: 3 s.
    #[serde(default, with = "halo_consul::duration::serde_opt_str")]
    pub announce_lease: Option<Duration>,
    /// ecmp: on SIGTERM, how long the withdrawn instance keeps accepting
    /// before it closes its listeners, for the routers to stop sending it
    /// new flows (a withdrawal takes the routing daemon and the routers a
    /// few milliseconds to tens of milliseconds). Up to 30 s. Unset: 1 s.
    #[serde(default, with = "halo_consul::duration::serde_opt_str")]
    pub withdraw_wait: Option<Duration>,
    /// ecmp: at most this many instances announce at once, the longest-
    /// standing members first; the others serve nothing and wait as hot
    /// spares (for a router's ECMP path limit, say). Unset: no cap.
    pub max_announcing: Option<u32>,
    /// ecmp: how many instances should be announcing; fewer raise the
    /// `HaloEcmpFewerAnnouncing` alert (`halo_ecmp_expected_announcing`).
    /// Unset: `max_announcing`, if set.
    pub expect_announcing: Option<u32>,
    /// The pair's name; its lock is the key `halo/<cluster>/leader`. Unset:
    /// "default".
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// This instance's name, unique in the pair. Unset:
    /// `<hostname>-<admin port>-<network namespace inode, hex>`, unique per
    /// host and stable across restarts (see `settings::ha::default_id`).
    pub id: Option<String>,
    /// TTL of this instance's `halo-lb` service check, which the session is
    /// bound to, heartbeated four times per TTL: how long Consul alone takes
    /// to notice a dead process when no standby probes it. Unset: 1 s.
    #[serde(default = "default_check_ttl", with = "go_duration")]
    pub check_ttl: Duration,
    /// The session's lock delay: after the active's session is invalidated,
    /// nobody may take the lock for this long. It is also the active's
    /// lease: the active serves only until four fifths of it after its last
    /// read of the lock that the Consul servers confirmed, and confirms five
    /// times per lock delay. The main knob of failover time (a forced
    /// takeover waits it out) against tolerance of slow Consul answers.
    /// 100 ms to 60 s. Unset: 300 ms.
    #[serde(default = "default_lock_delay", with = "go_duration")]
    pub lock_delay: Duration,
    /// Where this instance answers its peers' probes (UDP `ip:port`, and
    /// TCP on the same address to corroborate refusals; advertised in the
    /// lock's value). Unset: the admin address when `admin.listen` is a
    /// specific non-loopback address; otherwise the address the local
    /// Consul agent advertises for this node (`/v1/agent/self`), on the
    /// admin port. Set it when neither is an address the other balancers
    /// reach (halo-lb in a container network namespace, say).
    pub probe_listen: Option<String>,
    /// How often a standby probes the active. Unset: 100 ms.
    #[serde(default = "default_probe_interval", with = "go_duration")]
    pub probe_interval: Duration,
    /// Probes in a row without an answer after which a standby takes the
    /// lock from the active (a refused probe counts at once). Unset: 3.
    #[serde(default = "default_probe_misses")]
    pub probe_misses: u32,
    /// A floating address (`198.18.0.100/24` or `2001:db8::100/64`; no
    /// prefix means /32 or /128) that the active adds to `vip_interface`
    /// and announces with gratuitous ARP (IPv4) or unsolicited neighbour
    /// advertisements (IPv6). Needs CAP_NET_ADMIN and CAP_NET_RAW. Unset: the pair shares one host, and the active
    /// is simply the one with the listeners bound.
    pub vip_address: Option<String>,
    /// The interface carrying `vip_address`. Set both or neither.
    pub vip_interface: Option<String>,
}

/// `ha.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HaMode {
    /// One active, elected through a Consul lock; warm standbys.
    #[default]
    Pair,
    /// Every healthy instance serves and announces the VIPs; the routers
    /// spread flows over them.
    Ecmp,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin API (`/metrics`, `/status`, `/health`).
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// A file holding the bearer token the write endpoints require
    /// (`Authorization: Bearer <token>`), from any peer; owner-only mode,
    /// read at start and on every SIGHUP. Both instances of a pair need the
    /// same token (the standby forwards writes with its own). Unset: the
    /// `HALO_ADMIN_TOKEN_FILE` variable; if that is unset too, writes are
    /// accepted only from loopback peers.
    #[serde(default)]
    pub token_file: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token_file: None,
        }
    }
}

/// `[consul]`: the agent halo-lb asks (normally the local one), as both
/// programs write it ([`halo_consul::Section`]); halo-lb makes blocking
/// queries, so it also takes `wait` (unset: [`DEFAULT_CONSUL_WAIT`]).
pub type ConsulConfig = halo_consul::Section<true>;

/// How a VIP picks a backend for a new connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Weighted round robin (smooth interleaving).
    #[default]
    RoundRobin,
    /// Fewest live connections relative to weight.
    LeastConn,
    /// Power of two choices: the less loaded of two random backends.
    P2c,
    /// Maglev consistent hashing on the client address.
    Maglev,
}

/// PROXY protocol header sent to backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    /// No header.
    #[default]
    Off,
    /// Text header, version 1.
    V1,
    /// Binary header, version 2.
    V2,
}

/// Which kernel interface the data-plane workers use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataPlane {
    /// io_uring if this kernel and sandbox allow it (a probe at start),
    /// otherwise epoll.
    #[default]
    Auto,
    /// io_uring, or refuse to start.
    IoUring,
    /// epoll (tokio), whatever the kernel offers.
    Epoll,
}

/// How bytes are moved between client and backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMode {
    /// Through a user-space buffer (read/write) only.
    Buffered,
    /// Through the buffer for small messages, and zero-copy through a
    /// kernel pipe with splice(2) once a direction carries bulk (a read
    /// fills the buffer), like HAProxy's `splice-auto`. The default: the
    /// same cost for requests and responses, less than half the CPU per
    /// byte for bulk; pipes are bounded (a quarter of the descriptors).
    #[default]
    Splice,
}

/// The transport a VIP balances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// TCP connections, each proxied to one backend connection.
    #[default]
    Tcp,
    /// UDP datagrams, in flows (a client address and port), each flow
    /// sent to one backend through its own connected socket.
    Udp,
}

impl Protocol {
    /// `"tcp"` or `"udp"`, as in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Passive health: what the data plane does with backends that refuse
/// connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveConfig {
    /// Consecutive connect failures that eject a backend. 0 disables ejection.
    #[serde(default = "default_eject_after")]
    pub eject_after: u32,
    /// First ejection time; doubles on each consecutive ejection.
    #[serde(default = "default_base_ejection", with = "go_duration")]
    pub base_ejection: Duration,
    /// Longest ejection time.
    #[serde(default = "default_max_ejection", with = "go_duration")]
    pub max_ejection: Duration,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            eject_after: DEFAULT_EJECT_AFTER,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
        }
    }
}

/// One backend as written in the file: `"host:port"` or
/// `{ address = "host:port", weight = 5, zone = "zone-a", region = "eu", rack = "r12" }`.
///
/// Deserialized by hand rather than `#[serde(untagged)]`, whose only error
/// is "did not match any variant": a string is an address, a table is read
/// field by field, so a bad weight says which field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// Just the address; weight 1, no zone.
    Address(String),
    /// Address with weight and fault domain.
    Detailed {
        /// `ip:port`.
        address: String,
        /// Relative share of connections; unset: 1.
        weight: u32,
        /// Fault domain; unset: none.
        zone: Option<String>,
        /// Region (wider than the zone), for the fault-domain spread;
        /// unset: none.
        region: Option<String>,
        /// Rack (narrower than the zone), for the fault-domain spread;
        /// unset: none.
        rack: Option<String>,
    },
}

/// The table form of [`BackendSpec`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetailedSpec {
    address: String,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    rack: Option<String>,
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Spec;
        impl<'de> serde::de::Visitor<'de> for Spec {
            type Value = BackendSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""ip:port" or { address = "ip:port", weight = 1..1000, zone = "...", region = "...", rack = "..." }"#)
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BackendSpec, E> {
                Ok(BackendSpec::Address(v.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<BackendSpec, A::Error> {
                let d = DetailedSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(BackendSpec::Detailed {
                    address: d.address,
                    weight: d.weight,
                    zone: d.zone,
                    region: d.region,
                    rack: d.rack,
                })
            }
        }
        deserializer.deserialize_any(Spec)
    }
}

/// `[[vip]]`: one virtual IP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// Unique name, used in metrics, `/status` and admin paths.
    pub name: String,
    /// `ip:port` to accept on.
    pub listen: String,
    /// `"tcp"` or `"udp"`. Unset: tcp. A TCP and a UDP VIP may listen on
    /// the same address and port (DNS on both, for example).
    #[serde(default)]
    pub protocol: Protocol,
    /// UDP only: a flow with no datagram either way for this long ends.
    /// Unset: [`DEFAULT_UDP_IDLE_TIMEOUT`].
    #[serde(default, with = "halo_consul::duration::serde_opt_str")]
    pub udp_idle_timeout: Option<Duration>,
    /// UDP only: a flow ends once every datagram the client sent on it has
    /// had this many datagrams back (as NGINX's `proxy_responses`; 1 for
    /// DNS). Unset: flows end only when idle.
    pub udp_responses: Option<u32>,
    /// Balancing algorithm. Unset: round robin.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Static backends. Exactly one of `backends` and `service` is set.
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// Consul service whose instances are the backends (watched with
    /// blocking queries on `/v1/health/service/<service>`): passing ones
    /// with their `Weights.Passing`, warning ones with their
    /// `Weights.Warning`, critical ones left out, as Consul's DNS does.
    pub service: Option<String>,
    /// Only instances with this tag. Unset: all.
    pub service_tag: Option<String>,
    /// Deadline of one backend connect. Unset: 1 s.
    #[serde(default = "default_connect_timeout", with = "go_duration")]
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed. Unset: 5 m.
    #[serde(default = "default_idle_timeout", with = "go_duration")]
    pub idle_timeout: Duration,
    /// Most live client connections; beyond it, accepting pauses (clients
    /// wait in the listen backlog). For a UDP VIP, the most live flows:
    /// beyond it, a new flow takes the place of the one idle longest.
    /// Unset: 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// PROXY protocol header sent to backends. Unset: off.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Copy strategy. Unset: splice (see [`CopyMode::Splice`]).
    #[serde(default)]
    pub copy: CopyMode,
    /// Other backends tried after a failed connect. Unset: 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Listen backlog. Unset: 4096.
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// Passive ejection settings.
    #[serde(default)]
    pub passive: PassiveConfig,
    /// DNS discovery: the backends are the SRV records of a name (for
    /// example Consul's `web.service.consul`), looked up on an interval.
    /// Exactly one of `backends`, `service` and `dns` is set.
    #[serde(default)]
    pub dns: Option<DnsConfig>,
    /// With the balancer's `zone` set: route to local-zone backends while
    /// at least this fraction (0 to 1) of them is healthy (not disabled,
    /// not ejected, not failing an active check), at least one; below it,
    /// use every zone. Unset: [`DEFAULT_ZONE_MIN_HEALTHY`]. Ignored without
    /// `zone`.
    #[serde(default = "default_zone_min_healthy")]
    pub zone_min_healthy: Fraction,
    /// Active health checks of every backend in the table (`[vip.check]`).
    /// Unset: none; only passive ejection and the backend source (Consul's
    /// checks, for discovered backends) decide.
    #[serde(default)]
    pub check: Option<ActiveCheckConfig>,
}

/// A fraction as written in the file (`0.7`); validation keeps it within
/// 0..=1. Compared by its bits, so it can live in `Eq` config structs.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(transparent)]
pub struct Fraction(pub f64);

impl PartialEq for Fraction {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Fraction {}

/// `dns = { name = "web.service.consul", server = "127.0.0.1:8600" }`: a
/// VIP's backends from DNS SRV records.
///
/// Lookups always go over TCP: Consul (1.8 and later alike) cuts large UDP
/// answers to a few records *without* setting the TC bit, so a UDP client
/// cannot tell a cut answer from a complete one, and would swap tables
/// between random subsets. Each refresh opens a fresh connection (servers,
/// Consul among them, close idle TCP connections after a few seconds, so a
/// kept one would fail the first query after each close); at one refresh
/// per interval the connect costs nothing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// The name whose SRV records are the backends, e.g.
    /// `web.service.consul`, `v1.web.service.consul` (tag `v1`) or
    /// `_web._tcp.service.consul`. Always looked up as a full name (no
    /// search domains).
    pub name: String,
    /// The DNS server, `ip:port`. Unset: [`DEFAULT_DNS_SERVER`], a local
    /// Consul agent.
    #[serde(default = "default_dns_server")]
    pub server: String,
    /// Time between lookups. Unset: [`DEFAULT_DNS_INTERVAL`].
    #[serde(default = "default_dns_interval", with = "go_duration")]
    pub interval: Duration,
    /// Deadline of one lookup (SRV plus any address lookups). Unset:
    /// [`DEFAULT_DNS_TIMEOUT`].
    #[serde(default = "default_dns_timeout", with = "go_duration")]
    pub timeout: Duration,
}

/// The protocol of an active check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveCheckType {
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 GET whose status decides.
    Http,
}

/// `[vip.check]`: the balancer's own health check of each backend, run by
/// halo-health's checker with rise/fall hysteresis. A backend that fails it
/// is not picked (like an ejected one, panic mode included) without a table
/// rebuild; an operator's disable stays a separate state.
///
/// A new backend starts *up*: its source (Consul's health view, or the
/// operator's list) already vouches for it, and starting down would take
/// capacity away on every table change. It goes down after `fall` failures
/// in a row and comes back after `rise` passes in a row.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveCheckConfig {
    /// `tcp` (connect) or `http` (GET `path`, status in `expect_status`).
    #[serde(rename = "type")]
    pub kind: ActiveCheckType,
    /// Time between checks of one backend (each wait is jittered by up to a
    /// tenth). Unset: [`DEFAULT_CHECK_INTERVAL`].
    #[serde(default = "default_check_interval", with = "go_duration")]
    pub interval: Duration,
    /// Deadline of one check. Unset: [`DEFAULT_CHECK_TIMEOUT`].
    #[serde(default = "default_check_timeout", with = "go_duration")]
    pub timeout: Duration,
    /// Passes in a row that bring a down backend back. Unset:
    /// [`DEFAULT_CHECK_RISE`].
    #[serde(default = "default_check_rise")]
    pub rise: u32,
    /// Failures in a row that take an up backend out. Unset:
    /// [`DEFAULT_CHECK_FALL`].
    #[serde(default = "default_check_fall")]
    pub fall: u32,
    /// HTTP only: the path requested. Unset: `/`.
    #[serde(default)]
    pub path: Option<String>,
    /// HTTP only: the statuses that pass, `"200"` or `"200-399"`. Unset:
    /// `200-399`.
    #[serde(default)]
    pub expect_status: Option<String>,
    /// The port checked, when the backend serves its health elsewhere.
    /// Unset: the backend's own port.
    #[serde(default)]
    pub port: Option<u16>,
}

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_owned()
}
fn default_drain_timeout() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_retries() -> u32 {
    DEFAULT_RETRIES
}
fn default_backlog() -> u32 {
    DEFAULT_BACKLOG
}
fn default_eject_after() -> u32 {
    DEFAULT_EJECT_AFTER
}
fn default_base_ejection() -> Duration {
    DEFAULT_BASE_EJECTION
}
fn default_max_ejection() -> Duration {
    DEFAULT_MAX_EJECTION
}
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}
fn default_cluster() -> String {
    DEFAULT_HA_CLUSTER.to_owned()
}
fn default_check_ttl() -> Duration {
    DEFAULT_CHECK_TTL
}
fn default_lock_delay() -> Duration {
    DEFAULT_LOCK_DELAY
}
fn default_probe_interval() -> Duration {
    DEFAULT_PROBE_INTERVAL
}
fn default_probe_misses() -> u32 {
    DEFAULT_PROBE_MISSES
}
fn default_zone_min_healthy() -> Fraction {
    Fraction(DEFAULT_ZONE_MIN_HEALTHY)
}
fn default_dns_server() -> String {
    DEFAULT_DNS_SERVER.to_owned()
}
fn default_dns_interval() -> Duration {
    DEFAULT_DNS_INTERVAL
}
fn default_dns_timeout() -> Duration {
    DEFAULT_DNS_TIMEOUT
}
fn default_check_interval() -> Duration {
    DEFAULT_CHECK_INTERVAL
}
fn default_check_timeout() -> Duration {
    DEFAULT_CHECK_TIMEOUT
}
fn default_check_rise() -> u32 {
    DEFAULT_CHECK_RISE
}
fn default_check_fall() -> u32 {
    DEFAULT_CHECK_FALL
}
