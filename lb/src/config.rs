//! halo-lb's configuration file (TOML): parsing, defaults, validation.
//!
//! Validation reports every bad field at once, each named by its path
//! (`vip[1].backends[0]`), before anything starts; a reload that fails it
//! leaves the running configuration in place.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use halo_consul::duration::serde_str as go_duration;
use serde::Deserialize;

use crate::active_check::CheckSpec;
use crate::dns::DnsTarget;
use crate::zone::ZonePolicy;

/// Default admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Default time a new backend connection may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time a proxied connection may sit with no bytes either way.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
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
    /// The pair's name; its lock is the key `halo/<cluster>/leader`. Unset:
    /// "default".
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// This instance's name, unique in the pair. Unset: the host name and
    /// the admin port, `<host>-<port>`.
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
    /// Where this instance answers its peers' probes (UDP `ip:port`,
    /// advertised in the lock's value). Unset: the admin address (same ip
    /// and port, UDP). Set it to an address the other balancers reach when
    /// the admin API stays on loopback.
    pub probe_listen: Option<String>,
    /// How often a standby probes the active. Unset: 100 ms.
    #[serde(default = "default_probe_interval", with = "go_duration")]
    pub probe_interval: Duration,
    /// Probes in a row without an answer after which a standby takes the
    /// lock from the active (a refused probe counts at once). Unset: 3.
    #[serde(default = "default_probe_misses")]
    pub probe_misses: u32,
    /// A floating address (`198.18.0.100/24`; no prefix means /32) that the
    /// active adds to `vip_interface` and announces with gratuitous ARP.
    /// Needs CAP_NET_ADMIN. Unset: the pair shares one host, and the active
    /// is simply the one with the listeners bound.
    pub vip_address: Option<String>,
    /// The interface carrying `vip_address`. Set both or neither.
    pub vip_interface: Option<String>,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin API (`/metrics`, `/status`, `/health`).
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

/// `[consul]`: the agent halo-lb asks (normally the local one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulConfig {
    /// Agent address. Unset: `CONSUL_HTTP_ADDR`, else 127.0.0.1:8500.
    pub address: Option<String>,
    /// ACL token. Unset: `CONSUL_HTTP_TOKEN`, else none.
    pub token: Option<String>,
    /// Longest blocking-query wait. Unset: 60 s.
    #[serde(default, with = "halo_consul::duration::serde_opt_str")]
    pub wait: Option<Duration>,
}

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

/// How bytes are moved between client and backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMode {
    /// Through a user-space buffer (read/write). Lowest latency for small
    /// messages.
    #[default]
    Buffered,
    /// Zero-copy through a kernel pipe with splice(2). Highest bulk
    /// throughput.
    Splice,
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
/// `{ address = "host:port", weight = 5, zone = "zone-a" }`.
///
/// Deserialized by hand rather than `#[serde(untagged)]`, whose only error
/// is "did not match any variant": a string is an address, a table is read
/// field by field, so a bad weight says which field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// Just the address; weight 1, no zone.
    Address(String),
    /// Address with weight and zone.
    Detailed {
        /// `ip:port`.
        address: String,
        /// Relative share of connections; unset: 1.
        weight: u32,
        /// Fault domain; unset: none.
        zone: Option<String>,
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
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Spec;
        impl<'de> serde::de::Visitor<'de> for Spec {
            type Value = BackendSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""ip:port" or { address = "ip:port", weight = 1..1000, zone = "..." }"#)
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
    /// Balancing algorithm. Unset: round robin.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Static backends. Exactly one of `backends` and `service` is set.
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// Consul service whose passing instances are the backends (watched with
    /// blocking queries on `/v1/health/service/<service>?passing`).
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
    /// wait in the listen backlog). Unset: 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// PROXY protocol header sent to backends. Unset: off.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Copy strategy. Unset: buffered.
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
/// between random subsets. One TCP connection is kept to the server and
/// re-made after an error; at one query per interval its cost is nil.
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
/// A new backend starts *up*: its source (Consul's passing view, or the
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

/// A validated backend: address, weight and zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBackend {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share, ≥ 1.
    pub weight: u32,
    /// Fault domain.
    pub zone: Option<String>,
}

/// A validated configuration: the file plus parsed addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// The file as written.
    pub config: Config,
    /// The admin address.
    pub admin: SocketAddr,
    /// Per VIP (same order as `config.vips`): listen address and backends.
    pub vips: Vec<ValidatedVip>,
    /// The HA settings, if `[ha]` is present.
    pub ha: Option<HaSettings>,
}

/// Validated `[ha]`, with the timings derived from the check TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaSettings {
    /// The pair's name.
    pub cluster: String,
    /// This instance's name.
    pub id: String,
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
    /// Where this instance answers probes (UDP).
    pub probe: SocketAddr,
    /// How often a standby probes the active.
    pub probe_interval: Duration,
    /// Unanswered probes in a row that mean the active is gone.
    pub probe_misses: u32,
    /// The floating address and its prefix length, and the interface.
    pub floating: Option<FloatingAddress>,
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

/// One validated VIP.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedVip {
    /// The VIP as written.
    pub config: VipConfig,
    /// The listen address.
    pub listen: SocketAddr,
    /// Its static backends.
    pub backends: Vec<StaticBackend>,
    /// Zone-aware routing policy; `None` when the balancer has no `zone`.
    pub zone: Option<ZonePolicy>,
    /// The active check; `None` without `[vip.check]`.
    pub check: Option<CheckSpec>,
    /// DNS discovery; `None` unless `dns` is set.
    pub dns: Option<DnsTarget>,
}

/// Everything wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Where the config came from.
    pub source_name: String,
    /// Each problem: `field: reason`.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}: ", self.source_name)?;
        if let [one] = self.problems.as_slice() {
            return f.write_str(one);
        }
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Validated, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Config::parse(&text, &name)
    }

    /// Parses and validates TOML text; `name` appears in errors.
    pub fn parse(text: &str, name: &str) -> Result<Validated, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            source_name: name.to_owned(),
            problems: vec![describe_toml_error(&e)],
        })?;
        config.validate().map_err(|problems| ConfigError {
            source_name: name.to_owned(),
            problems,
        })
    }

    /// Checks every field; returns all problems, each naming its field.
    pub fn validate(self) -> Result<Validated, Vec<String>> {
        let mut problems = Vec::new();
        let admin = match self.admin.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!(
                    "admin.listen: {:?} is not an ip:port address",
                    self.admin.listen
                ));
                None
            }
        };
        if let Some(w) = self.workers.filter(|w| !(1..=MAX_WORKERS).contains(w)) {
            problems.push(format!("workers: {w} is not in 1..={MAX_WORKERS}"));
        }
        if self.vips.is_empty() {
            problems.push("vip: at least one [[vip]] is required".to_owned());
        }
        let mut names = HashSet::new();
        let mut listens: Vec<SocketAddr> = Vec::new();
        let mut vips = Vec::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let at = format!("vip[{i}]");
            if vip.name.is_empty() || !vip.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                problems.push(format!(
                    "{at}.name: {:?} must be non-empty and use only letters, digits, '-', '_', '.'",
                    vip.name
                ));
            } else if !names.insert(vip.name.clone()) {
                problems.push(format!("{at}.name: {:?} is used by another vip", vip.name));
            }
            let listen = match vip.listen.parse::<SocketAddr>() {
                Ok(a) => {
                    if let Some(other) = listens.iter().find(|&&b| listens_conflict(a, b)) {
                        problems.push(if *other == a {
                            format!("{at}.listen: {a} is used by another vip")
                        } else {
                            format!("{at}.listen: {a} overlaps {other} of another vip (a wildcard address takes the port on every address of its family)")
                        });
                    }
                    listens.push(a);
                    if let Some(admin) = admin.filter(|&b| listens_conflict(a, b)) {
                        problems.push(if admin == a {
                            format!("{at}.listen: {a} is the admin address")
                        } else {
                            format!("{at}.listen: {a} overlaps the admin address {admin}")
                        });
                    }
                    Some(a)
                }
                Err(_) => {
                    problems.push(format!("{at}.listen: {:?} is not an ip:port address", vip.listen));
                    None
                }
            };
            validate_backend_source(&at, vip, &mut problems);
            if vip.service_tag.is_some() && vip.service.is_none() {
                problems.push(format!("{at}.service_tag: only meaningful with `service`"));
            }
            let mut backends = Vec::new();
            let mut seen = HashSet::new();
            for (j, spec) in vip.backends.iter().enumerate() {
                let (address, weight, zone) = match spec {
                    BackendSpec::Address(a) => (a, DEFAULT_WEIGHT, None),
                    BackendSpec::Detailed { address, weight, zone } => (address, *weight, zone.clone()),
                };
                let Ok(addr) = address.parse::<SocketAddr>() else {
                    problems.push(format!("{at}.backends[{j}]: {address:?} is not an ip:port address"));
                    continue;
                };
                if addr.port() == 0 {
                    problems.push(format!("{at}.backends[{j}]: port 0 is not a backend port"));
                }
                if weight == 0 || weight > 1000 {
                    problems.push(format!("{at}.backends[{j}].weight: {weight} is not in 1..=1000"));
                }
                if !seen.insert(addr) {
                    problems.push(format!("{at}.backends[{j}]: {addr} is listed twice"));
                }
                backends.push(StaticBackend { addr, weight, zone });
            }
            if vip.connect_timeout.is_zero() {
                problems.push(format!("{at}.connect_timeout: must be above zero"));
            }
            if vip.idle_timeout.is_zero() {
                problems.push(format!("{at}.idle_timeout: must be above zero"));
            }
            if vip.max_connections == 0 {
                problems.push(format!("{at}.max_connections: must be at least 1"));
            }
            if vip.backlog == 0 {
                problems.push(format!("{at}.backlog: must be at least 1"));
            }
            if vip.passive.base_ejection.is_zero() && vip.passive.eject_after > 0 {
                problems.push(format!("{at}.passive.base_ejection: must be above zero"));
            }
            if vip.passive.max_ejection < vip.passive.base_ejection {
                problems.push(format!("{at}.passive.max_ejection: must be at least base_ejection"));
            }
            let zone = validate_zone_routing(&at, vip, self.zone.as_deref(), &mut problems);
            let check = vip
                .check
                .as_ref()
                .and_then(|c| CheckSpec::from_config(c, &format!("{at}.check"), &mut problems));
            let dns = vip
                .dns
                .as_ref()
                .and_then(|d| DnsTarget::from_config(d, &format!("{at}.dns"), &mut problems));
            if let Some(listen) = listen {
                vips.push(ValidatedVip {
                    config: vip.clone(),
                    listen,
                    backends,
                    zone,
                    check,
                    dns,
                });
            }
        }
        validate_zone(self.zone.as_deref(), &mut problems);
        if self.vips.iter().any(|v| v.service.is_some()) {
            let consul = halo_consul::Config {
                address: self.consul.address.clone(),
                token: self.consul.token.clone(),
                ..halo_consul::Config::default()
            };
            if let Err(e) = halo_consul::Client::new(consul) {
                problems.push(format!("consul.address: {e}"));
            }
        }
        if self
            .consul
            .wait
            .is_some_and(|w| w < Duration::from_secs(1) || w > Duration::from_secs(600))
        {
            problems.push("consul.wait: must be between 1s and 10m".to_owned());
        }
        let ha = self
            .ha
            .as_ref()
            .and_then(|ha| validate_ha(ha, admin, &self.consul, &mut problems));
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Validated {
            admin: admin.expect("checked above"),
            vips,
            ha,
            config: self,
        })
    }
}

/// The most data-plane threads: beyond a few per core they only cost
/// memory, descriptors and context switches.
pub const MAX_WORKERS: usize = 256;

/// Whether two listening addresses cannot both be bound: the same port, and
/// the same address, or a wildcard of the other's family (an IPv6 wildcard,
/// dual-stack by default, takes the IPv4 port too).
pub fn listens_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let (x, y) = (a.ip(), b.ip());
    x == y
        || (x.is_unspecified() && (x.is_ipv6() || y.is_ipv4()))
        || (y.is_unspecified() && (y.is_ipv6() || x.is_ipv4()))
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Checks `[ha]`; pushes each problem and returns the settings if there are
/// none.
/// The default `ha.id`: `<hostname>-<admin port>-<network namespace
/// inode, hex>`. Two containers may share a hostname and an admin port,
/// never a network namespace, so the id is unique per host; it is stable
/// across restarts of the process in one namespace. At most 64 characters
/// (the hostname part is cut). Set `ha.id` for a readable name.
fn default_id(host: &str, port: u16, netns: Option<u64>) -> String {
    let suffix = match netns {
        Some(inode) => format!("-{port}-{inode:x}"),
        None => format!("-{port}"),
    };
    let host: String = host.chars().take(64 - suffix.len()).collect();
    format!("{host}{suffix}")
}

/// This process's network namespace inode, from `/proc/self/ns/net`
/// ("net:[4026531992]").
fn netns_inode() -> Option<u64> {
    let link = std::fs::read_link("/proc/self/ns/net").ok()?;
    let text = link.to_str()?;
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

fn validate_ha(
    ha: &HaConfig,
    admin: Option<SocketAddr>,
    consul: &ConsulConfig,
    problems: &mut Vec<String>,
) -> Option<HaSettings> {
    let before = problems.len();
    if !is_name(&ha.cluster) {
        problems.push(format!(
            "ha.cluster: {:?} must be 1 to 64 letters, digits, '-', '_', '.'",
            ha.cluster
        ));
    }
    let id = match &ha.id {
        Some(id) => id.clone(),
        None => {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".to_owned());
            let host: String = host
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            default_id(&host, admin.map_or(0, |a| a.port()), netns_inode())
        }
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
        None => admin,
        Some(text) => match text.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => {
                problems.push(format!(
                    "ha.probe_listen: {a} is advertised to the peers; use a specific ip, not a wildcard"
                ));
                None
            }
            Ok(a) => Some(a),
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
    let consul = halo_consul::Config {
        address: consul.address.clone(),
        token: consul.token.clone(),
        ..halo_consul::Config::default()
    };
    if let Err(e) = halo_consul::Client::new(consul) {
        problems.push(format!("consul.address: {e}"));
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
    let probe = probe?;
    (problems.len() == before).then(|| HaSettings {
        cluster: ha.cluster.clone(),
        id,
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

/// Exactly one of `backends`, `service` and `dns`; a problem names the
/// field that is one too many.
fn validate_backend_source(at: &str, vip: &VipConfig, problems: &mut Vec<String>) {
    let set: Vec<&str> = [
        ("backends", !vip.backends.is_empty()),
        ("service", vip.service.is_some()),
        ("dns", vip.dns.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect();
    match set.as_slice() {
        [] => problems.push(format!(
            "{at}.backends: at least one backend, `service` for Consul discovery, or `dns` for DNS discovery, is required"
        )),
        [_] => {}
        [_, extra, ..] => problems.push(format!(
            "{at}.{extra}: set exactly one of `backends` (static), `service` (Consul) and `dns` (DNS SRV), not {}",
            set.join(" and ")
        )),
    }
    if let Some(name) = &vip.service {
        if name.is_empty() || name.contains(['/', '?', ' ']) {
            problems.push(format!("{at}.service: {name:?} is not a Consul service name"));
        }
    }
}

/// The balancer's own `zone`.
fn validate_zone(zone: Option<&str>, problems: &mut Vec<String>) {
    if let Some(zone) = zone {
        if zone.is_empty() || zone.contains(char::is_whitespace) {
            problems.push(format!("zone: {zone:?} must be non-empty, without spaces"));
        }
    }
}

/// A VIP's `zone_min_healthy`, and its policy when the balancer has a zone.
fn validate_zone_routing(
    at: &str,
    vip: &VipConfig,
    zone: Option<&str>,
    problems: &mut Vec<String>,
) -> Option<ZonePolicy> {
    let fraction = vip.zone_min_healthy.0;
    if !(0.0..=1.0).contains(&fraction) {
        problems.push(format!("{at}.zone_min_healthy: {fraction} is not between 0 and 1"));
        return None;
    }
    zone.map(|zone| ZonePolicy::new(zone, fraction))
}

/// toml's errors carry a span and a message; render them as
/// "line L, column C: message" plus the offending line.
fn describe_toml_error(e: &toml::de::Error) -> String {
    // toml's Display already shows line, column and the source line; keep it
    // but on one logical message.
    e.to_string().trim().replace("\n\n", "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [admin]
        listen = "127.0.0.1:9901"

        [[vip]]
        name = "web"
        listen = "127.0.0.1:8080"
        algorithm = "maglev"
        backends = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3, zone = "zone-b" }]
        connect_timeout = "250ms"
        idle_timeout = "5m"
        max_connections = 100
        proxy_protocol = "v2"
    "#;

    #[test]
    fn a_good_file_parses_with_defaults_filled_in() {
        let v = Config::parse(GOOD, "good.toml").unwrap();
        assert_eq!(v.admin, "127.0.0.1:9901".parse().unwrap());
        let vip = &v.vips[0];
        assert_eq!(vip.config.algorithm, Algorithm::Maglev);
        assert_eq!(vip.config.connect_timeout, Duration::from_millis(250));
        assert_eq!(vip.config.idle_timeout, Duration::from_secs(300));
        assert_eq!(vip.config.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(vip.config.retries, DEFAULT_RETRIES);
        assert_eq!(vip.config.copy, CopyMode::Buffered);
        assert_eq!(
            vip.backends[1],
            StaticBackend {
                addr: "127.0.0.1:9002".parse().unwrap(),
                weight: 3,
                zone: Some("zone-b".into())
            }
        );
        assert_eq!(vip.backends[0].weight, 1);
    }

    fn err(text: &str) -> String {
        Config::parse(text, "bad.toml").unwrap_err().to_string()
    }

    #[test]
    fn a_wildcard_and_a_specific_listen_on_one_port_conflict() {
        let vip = |name: &str, listen: &str| {
            format!("[[vip]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbackends = [\"127.0.0.1:2\"]\n")
        };
        let e = err(&format!("{}{}", vip("a", "0.0.0.0:8080"), vip("b", "127.0.0.1:8080")));
        assert!(e.contains("vip[1].listen: 127.0.0.1:8080 overlaps 0.0.0.0:8080"), "{e}");
        let e = err(&format!("{}{}", vip("a", "[::]:8080"), vip("b", "127.0.0.1:8080")));
        assert!(e.contains("overlaps [::]:8080"), "{e}");
        let e = err(&format!(
            "[admin]\nlisten = \"127.0.0.1:9901\"\n{}",
            vip("a", "0.0.0.0:9901")
        ));
        assert!(
            e.contains("vip[0].listen: 0.0.0.0:9901 overlaps the admin address"),
            "{e}"
        );
        // Different ports, or an IPv6 address beside an IPv4 wildcard: fine.
        Config::parse(
            &format!("{}{}", vip("a", "0.0.0.0:8080"), vip("b", "127.0.0.1:8081")),
            "ok",
        )
        .unwrap();
        Config::parse(&format!("{}{}", vip("a", "0.0.0.0:8080"), vip("b", "[::1]:8080")), "ok").unwrap();
    }

    #[test]
    fn workers_have_an_upper_bound_and_weights_say_what_is_wrong() {
        let base = "[[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:1\"\n";
        let e = err(&format!("workers = 1000\n{base}backends = [\"127.0.0.1:2\"]\n"));
        assert!(e.contains("workers: 1000 is not in 1..=256"), "{e}");
        let e = err(&format!(
            "{base}backends = [{{ address = \"127.0.0.1:2\", weight = 5000000000 }}]\n"
        ));
        assert!(!e.contains("did not match any variant"), "{e}");
        assert!(e.contains("line 4") && e.contains("5000000000"), "{e}");
        let e = err(&format!(
            "{base}backends = [{{ address = \"127.0.0.1:2\", wieght = 3 }}]\n"
        ));
        assert!(e.contains("unknown field `wieght`"), "{e}");
        let e = err(&format!("{base}backends = [17]\n"));
        assert!(e.contains("\"ip:port\" or"), "{e}");
    }

    #[test]
    fn the_default_id_is_unique_per_network_namespace_and_bounded() {
        assert_eq!(default_id("lb", 9901, Some(0xeffffff9)), "lb-9901-effffff9");
        assert_ne!(default_id("lb", 9901, Some(1)), default_id("lb", 9901, Some(2)));
        assert_eq!(default_id("lb", 9901, None), "lb-9901");
        let long = "h".repeat(200);
        let id = default_id(&long, 65535, Some(u64::MAX));
        assert_eq!(id.len(), 64);
        assert!(is_name(&id));
    }

    #[test]
    fn type_and_syntax_errors_name_the_key() {
        let e = err(
            "[[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"]\nalgorithm = \"random\"\n",
        );
        assert!(e.contains("algorithm") || e.contains("line 5"), "{e}");
        assert!(e.contains("random"), "{e}");
        let e = err("[[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"]\nidle_timeout = \"5 minutes\"\n");
        assert!(e.contains("idle_timeout") || e.contains("line 5"), "{e}");
        assert!(e.contains("invalid duration"), "{e}");
        let e = err(
            "[[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"]\nalgoritm = \"p2c\"\n",
        );
        assert!(e.contains("unknown field `algoritm`"), "{e}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_field() {
        let e = err(r#"
            [admin]
            listen = "nowhere"
            [[vip]]
            name = "web"
            listen = "127.0.0.1:8080"
            backends = ["127.0.0.1:9001", "not-an-address", { address = "127.0.0.1:9003", weight = 0 }]
            max_connections = 0
            [[vip]]
            name = "web"
            listen = "127.0.0.1:8080"
            backends = []
        "#);
        for needle in [
            "admin.listen",
            "vip[0].backends[1]: \"not-an-address\"",
            "vip[0].backends[2].weight",
            "vip[0].max_connections",
            "vip[1].name: \"web\" is used",
            "vip[1].listen: 127.0.0.1:8080 is used",
            "vip[1].backends: at least one",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
        assert!(err("").contains("at least one [[vip]]"));
    }

    #[test]
    fn ha_settings_are_derived_and_every_bad_field_is_named() {
        let base = "[[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"]\n";
        let v = Config::parse(&format!("{base}[ha]\nid = \"lb-1\"\n"), "ok.toml").unwrap();
        let ha = v.ha.unwrap();
        assert_eq!(ha.lock_key(), "halo/default/leader");
        assert_eq!((ha.check_ttl, ha.lock_delay), (DEFAULT_CHECK_TTL, DEFAULT_LOCK_DELAY));
        assert_eq!(ha.heartbeat, Duration::from_millis(250));
        assert_eq!(ha.margin, Duration::from_millis(60));
        assert_eq!(ha.lease, Duration::from_millis(240));
        assert_eq!(ha.confirm_every, Duration::from_millis(60));
        assert_eq!(
            (ha.probe_interval, ha.probe_misses),
            (DEFAULT_PROBE_INTERVAL, DEFAULT_PROBE_MISSES)
        );
        assert!(ha.floating.is_none());
        let v = Config::parse(
            &format!("{base}[ha]\nvip_address = \"198.18.0.100/24\"\nvip_interface = \"eth0\"\n"),
            "ok.toml",
        )
        .unwrap();
        let floating = v.ha.unwrap().floating.unwrap();
        assert_eq!(
            (floating.address.to_string(), floating.prefix),
            ("198.18.0.100".to_owned(), 24)
        );

        let e = err(&format!(
            "[admin]\nlisten = \"0.0.0.0:9901\"\n{base}[ha]\ncluster = \"a/b\"\nid = \"\"\ncheck_ttl = \"100ms\"\nlock_delay = \"10ms\"\nvip_address = \"not-an-ip\"\nprobe_listen = \"here\"\nprobe_interval = \"1ms\"\nprobe_misses = 0\n"
        ));
        for needle in [
            "ha.cluster: \"a/b\"",
            "ha.id: \"\"",
            "ha.check_ttl: 100ms",
            "ha.lock_delay: 10ms is below 100ms",
            "ha.probe_listen: \"here\"",
            "ha.probe_interval: 1ms",
            "ha.probe_misses: 0",
            "admin.listen: an HA instance advertises",
            "ha.vip_interface: required with vip_address",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
        let e = err(&format!(
            "{base}[ha]\nvip_address = \"198.18.0.100/33\"\nvip_interface = \"eth0\"\n"
        ));
        assert!(e.contains("ha.vip_address: \"198.18.0.100/33\""), "{e}");
    }
}

/// The loader against random and mangled files: it never panics, and every
/// error names a field (`vip[0].listen: …`) or a line (TOML syntax and type
/// errors).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    const EXAMPLES: [&str; 5] = [
        include_str!("../../packaging/examples/lb.toml"),
        include_str!("../../packaging/examples/lb-consul.toml"),
        include_str!("../../packaging/examples/lb-dns.toml"),
        include_str!("../../packaging/examples/lb-ha-1.toml"),
        include_str!("../../packaging/examples/lb-ha-2.toml"),
    ];

    const VALUES: [&str; 16] = [
        "-1",
        "0",
        "99999999999999999999",
        "1e308",
        "\"\"",
        "\"x\"",
        "\"1ns\"",
        "\"999999999h\"",
        "\"0.0.0.0:0\"",
        "\"[::]:8080\"",
        "[]",
        "{}",
        "true",
        "[\"127.0.0.1:1\", \"127.0.0.1:1\"]",
        "{ address = \"127.0.0.1:2\", weight = 4294967296 }",
        "\"\\u0000\"",
    ];

    /// One edit of a file's lines.
    #[derive(Debug, Clone)]
    enum Edit {
        Drop(usize),
        Duplicate(usize),
        /// Replaces the value of a `key = value` line.
        Value(usize, usize),
        Truncate(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            any::<usize>().prop_map(Edit::Drop),
            any::<usize>().prop_map(Edit::Duplicate),
            (any::<usize>(), 0..VALUES.len()).prop_map(|(l, v)| Edit::Value(l, v)),
            any::<usize>().prop_map(Edit::Truncate),
        ]
    }

    fn apply(text: &str, edits: &[Edit]) -> String {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        for e in edits {
            if lines.is_empty() {
                break;
            }
            let n = lines.len();
            match *e {
                Edit::Drop(l) => {
                    lines.remove(l % n);
                }
                Edit::Duplicate(l) => {
                    let line = lines[l % n].clone();
                    lines.insert(l % n, line);
                }
                Edit::Value(l, v) => {
                    let line = &mut lines[l % n];
                    if let Some((key, _)) = line.split_once('=') {
                        *line = format!("{key}= {}", VALUES[v]);
                    }
                }
                Edit::Truncate(at) => {
                    let text = lines.join("\n");
                    let mut cut = at % (text.len() + 1);
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    lines = text[..cut].lines().map(str::to_owned).collect();
                }
            }
        }
        lines.join("\n")
    }

    /// `field: reason`, where field is a dotted path with indices, or a
    /// TOML error that points at a line.
    fn names_a_field_or_line(problem: &str) -> bool {
        if problem.contains("line ") {
            return true;
        }
        let Some((field, reason)) = problem.split_once(": ") else {
            return false;
        };
        !reason.is_empty()
            && !field.is_empty()
            && field.chars().all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c))
    }

    fn check(text: &str) -> Result<(), TestCaseError> {
        if let Err(e) = Config::parse(text, "fuzz.toml") {
            prop_assert!(!e.problems.is_empty());
            for p in &e.problems {
                prop_assert!(
                    names_a_field_or_line(p),
                    "{:?} names no field or line; file:\n{}",
                    p,
                    text
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
        ))]

        #[test]
        fn mangled_examples_never_panic_and_errors_are_placed(
            example in 0..EXAMPLES.len(),
            edits in proptest::collection::vec(edit(), 1..6),
        ) {
            check(&apply(EXAMPLES[example], &edits))?;
        }

        #[test]
        fn random_text_never_panics(text in "(\\PC|\n|=|\\[|\\]|\"){0,300}") {
            check(&text)?;
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            check(&String::from_utf8_lossy(&bytes))?;
        }
    }

    #[test]
    fn every_example_is_valid() {
        for (i, text) in EXAMPLES.iter().enumerate() {
            if let Err(e) = Config::parse(text, "example") {
                panic!("example {i}: {e}");
            }
        }
    }
}
