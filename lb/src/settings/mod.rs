//! Settings: halo-lb's configuration file and what validation makes of it.
//!
//! Plain data, and the bottom of the crate: nothing here imports from the
//! rest of halo-lb, and everything else may import from here.
//!
//! - [`file`](mod@file): the TOML schema as serde reads it, with its defaults.
//! - [`Config::validate`] (in `validate`): every field checked at once,
//!   each problem named by its path (`vip[1].backends[0]: …`), before
//!   anything starts; a reload that fails it leaves the running
//!   configuration in place.
//! - The validated settings: [`Validated`], one [`ValidatedVip`] per
//!   `[[vip]]` with its [`VipSettings`] and its [`BackendSource`], and
//!   [`HaSettings`], [`CheckSpec`], [`DnsTarget`], [`ZonePolicy`].
//!
//! Validation runs wherever the file is loaded: on the main thread at
//! start, on a blocking thread on SIGHUP, and in `halo-lb check`.

mod check;
mod dns;
pub mod file;
mod ha;
mod validate;
mod zone;

#[cfg(test)]
mod reference;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use self::check::CheckSpec;
pub use self::dns::DnsTarget;
pub use self::file::*;
pub use self::ha::{EcmpSettings, FloatingAddress, HaSettings, ProbeListen};
pub use self::zone::ZonePolicy;

/// A backend as a source describes it: a static list, Consul or DNS.
///
/// Equality covers address, weight and fault domain (zone, region, rack), so a change of any of them makes
/// a new table; hashing for consistent selection uses the address only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of new connections, 1 to 1000.
    pub weight: u32,
    /// Fault domain (zone), if known.
    pub zone: Option<String>,
    /// Region (a wider fault domain than the zone), if known.
    pub region: Option<String>,
    /// Rack (a narrower fault domain than the zone), if known.
    pub rack: Option<String>,
}

/// Where a VIP's backends come from: exactly one source per VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSource {
    /// `backends = [...]`: a fixed list.
    Static(Vec<Backend>),
    /// `service = "..."`: Consul's health view of a service.
    Consul(ConsulTarget),
    /// `dns = { ... }`: the SRV records of a name.
    Dns(DnsTarget),
}

/// What a VIP's Consul discovery watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulTarget {
    /// Consul service name.
    pub service: String,
    /// Only instances with this tag.
    pub tag: Option<String>,
}

/// `[consul]` validated: how to reach the agent.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsulSettings {
    /// Agent address; `None`: `CONSUL_HTTP_ADDR`, else 127.0.0.1:8500.
    pub address: Option<String>,
    /// ACL token; `None`: see `token_file`.
    pub token: Option<String>,
    /// ACL token file (wins over `token`); `None`: `CONSUL_HTTP_TOKEN_FILE`,
    /// else `CONSUL_HTTP_TOKEN`, else none.
    pub token_file: Option<std::path::PathBuf>,
    /// TLS to the agent; unset fields come from Consul's variables.
    pub tls: halo_consul::TlsConfig,
    /// Longest wait of one blocking query.
    pub wait: Duration,
}

impl std::fmt::Debug for ConsulSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulSettings")
            .field("address", &self.address.as_deref().map(halo_consul::redact_address))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("tls", &self.tls)
            .field("wait", &self.wait)
            .finish()
    }
}

impl ConsulSettings {
    /// A client for these settings. Each runtime that talks to Consul makes
    /// its own (a client's connection pool belongs to the runtime it was
    /// first used on), sharing one [`halo_consul::Token`] through
    /// [`halo_consul::Client::sharing_token`] so a SIGHUP's new token
    /// reaches all. Validation has already made one, so an error here means
    /// the environment or a file changed since.
    pub fn client(&self) -> Result<halo_consul::Client, halo_consul::Error> {
        halo_consul::Client::new(self.client_config())
    }

    /// A client for these settings that reads its ACL token from `token`
    /// (the process's shared cell) and reads no token file: for the control
    /// runtime's thread, where a file read must not happen (see
    /// [`halo_consul::file`]).
    pub fn client_sharing(&self, token: &halo_consul::Token) -> Result<halo_consul::Client, halo_consul::Error> {
        halo_consul::Client::with_token(self.client_config(), token)
    }

    /// The token these settings name (reading the token file), for
    /// [`halo_consul::Token::adopt`] on reload. A file read: call it where
    /// blocking is harmless (start-up, the reload's own thread).
    pub fn token(&self) -> Result<halo_consul::Token, halo_consul::Error> {
        halo_consul::Token::resolve(&self.client_config(), |name| std::env::var(name).ok())
    }

    fn client_config(&self) -> halo_consul::Config {
        halo_consul::Config {
            address: self.address.clone(),
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            tls: self.tls.clone(),
            ..halo_consul::Config::default()
        }
    }
}

/// The per-VIP settings a connection reads from its table snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipSettings {
    /// Balancing algorithm.
    pub algorithm: Algorithm,
    /// Deadline of one backend connect.
    pub connect_timeout: Duration,
    /// Idle timeout of a proxied connection.
    pub idle_timeout: Duration,
    /// Live connection limit.
    pub max_connections: usize,
    /// PROXY protocol header to send.
    pub proxy_protocol: ProxyProtocol,
    /// Copy strategy.
    pub copy: CopyMode,
    /// Extra backends tried after a failed connect.
    pub retries: u32,
    /// Passive ejection policy.
    pub passive: PassiveConfig,
    /// Zone-aware routing; `None` when the balancer has no `zone`.
    pub zone: Option<ZonePolicy>,
    /// Active health check of every backend; `None`: no active checks.
    pub check: Option<CheckSpec>,
    /// UDP flows: idle timeout, and replies per datagram that end a flow.
    pub udp: UdpSettings,
}

/// How a UDP VIP's flows end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    /// A flow idle this long ends.
    pub idle_timeout: Duration,
    /// A flow ends once each of its client's datagrams had this many
    /// replies; `None`: only when idle.
    pub responses: Option<u32>,
}

impl Default for UdpSettings {
    fn default() -> Self {
        UdpSettings {
            idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            responses: None,
        }
    }
}

/// One validated `[[vip]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedVip {
    /// Unique name, used in metrics, `/status` and admin paths.
    pub name: String,
    /// The listen address.
    pub listen: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The listen backlog.
    pub backlog: u32,
    /// What its connections read from the table.
    pub settings: VipSettings,
    /// Where its backends come from.
    pub source: BackendSource,
}

/// Largest config file read: a config with thousands of static backends is
/// a few hundred KiB.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// The admin address.
    pub admin: SocketAddr,
    /// The admin API's write token, read from `admin.token_file` (or
    /// `HALO_ADMIN_TOKEN_FILE`); `None`: writes from loopback only.
    pub admin_token: Option<halo_health::auth::Token>,
    /// How long live connections may take to finish on SIGTERM.
    pub drain_timeout: Duration,
    /// Data-plane threads; `None`: one per core.
    pub workers: Option<usize>,
    /// Which kernel interface the workers use.
    pub data_plane: DataPlane,
    /// How to reach Consul (for VIPs with `service`, and for `[ha]`).
    pub consul: ConsulSettings,
    /// The VIPs, in the file's order.
    pub vips: Vec<ValidatedVip>,
    /// The HA settings, if `[ha]` is present.
    pub ha: Option<HaSettings>,
}

impl Validated {
    /// Whether anything talks to Consul: a VIP fed by it, or `[ha]`.
    pub fn needs_consul(&self) -> bool {
        self.ha.is_some() || self.vips.iter().any(|v| matches!(v.source, BackendSource::Consul(_)))
    }

    /// The Consul ACL token this configuration names (its token file read
    /// now), for `Server::apply`; `None` when nothing talks
    /// to Consul. A file read: call it at start or on the reload's own
    /// thread, never on the control runtime's.
    pub fn consul_token(&self) -> Result<Option<halo_consul::Token>, halo_consul::Error> {
        self.needs_consul().then(|| self.consul.token()).transpose()
    }
}

/// Everything wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Where the config came from.
    pub source_name: String,
    /// Each problem: `field: reason`.
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Validated, ConfigError> {
        let name = path.display().to_string();
        let problem = |reason: String| ConfigError {
            source_name: name.clone(),
            problems: vec![reason],
        };
        // Opened without blocking, regular files only, bounded: a FIFO at
        // the config path is refused rather than waited on.
        let bytes = halo_consul::file::read_regular(path, MAX_CONFIG_BYTES).map_err(|e| match e {
            halo_consul::file::FileError::Open(e) => problem(format!("cannot read the file: {e}")),
            e => problem(format!("the file {e}")),
        })?;
        let text = String::from_utf8(bytes).map_err(|_| problem("the file is not UTF-8 text".to_owned()))?;
        Config::parse(&text, &name)
    }

    /// Parses and validates TOML text; `name` appears in errors.
    pub fn parse(text: &str, name: &str) -> Result<Validated, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            source_name: name.to_owned(),
            // toml's message already shows line, column and the source line;
            // keep it as one logical message.
            problems: vec![e.to_string().trim().replace("\n\n", "\n")],
        })?;
        config.validate().map_err(|problems| ConfigError {
            source_name: name.to_owned(),
            problems,
        })
    }
}
