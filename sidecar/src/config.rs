//! halo-sidecar's configuration: a TOML file, every field of which can also
//! be set (or overridden) by a `HALO_*` environment variable.
//!
//! Variables map onto the file's structure: `HALO_SERVICE_PORT=9001` is
//! `[service] port = 9001`, `HALO_SERVICE_META_ZONE=zone-a` is
//! `[service.meta] zone = "zone-a"`, `HALO_CHECK_0_URL=...` is the first
//! `[[check]]`'s `url`. Values are read as TOML when they parse as such
//! (numbers, booleans, arrays) and as strings otherwise; `tags` and `command`
//! also take comma- or space-separated lists.
//!
//! Variables outside the sidecar's sections belong to other halo tools: the
//! known switches ([`OTHER_TOOLS_SWITCHES`], e.g. `HALO_NETNS_TESTS`) are
//! ignored silently, any other is ignored with a warning, and one whose first
//! word is a near miss of a section (`HALO_SERVIC_PORT`) is an error that
//! suggests the right name. An unknown field inside a section is an error.
//!
//! Validation follows what the Consul agent would refuse with a 400 (its
//! `ValidateServiceMetadata`, `ValidateWeights` and service-address rules),
//! so a config that passes `halo-sidecar check` is not refused at run time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use halo_consul::duration::serde_str as go_duration;
use halo_health::probe::parse_status_range;
use halo_health::{CheckConfig, ExecProbe, HttpProbe, Probe};
use serde::Deserialize;

/// Default admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9902";
/// Default drain grace.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Default TTL of the Consul checks the sidecar pushes to; heartbeats go out
/// every third of it.
pub const DEFAULT_CHECK_TTL: Duration = Duration::from_secs(10);
/// Default time after which Consul drops the workload of a dead sidecar
/// (Consul's minimum is 1 minute).
pub const DEFAULT_DEREGISTER_AFTER: Duration = Duration::from_secs(60);

/// `HALO_*` variables of other halo tools, ignored without a word.
pub const OTHER_TOOLS_SWITCHES: &[&str] = &[
    "HALO_NETNS_TESTS",
    "HALO_DEMO_ONESHOT",
    "HALO_LB_BIN",
    "HALO_IT_FLOATING_HELPER",
];
/// The sidecar's sections, as they appear after `HALO_`.
const SECTIONS: &[&str] = &["consul", "service", "check", "admin", "drain"];
/// Most `[[check]]`s one `HALO_CHECK_<n>_…` may address (so a typo such as
/// `HALO_CHECK_99999999_URL` cannot allocate millions of empty checks).
pub const MAX_CHECKS: usize = 64;

/// Consul's limits on service metadata (`agent/structs`:
/// `metaMaxKeyPairs`, `metaKeyMaxLength`, `metaValueMaxLength`,
/// `metaKeyReservedPrefix`).
pub const META_MAX_PAIRS: usize = 64;
/// Longest metadata key Consul accepts, in bytes.
pub const META_KEY_MAX_LEN: usize = 128;
/// Longest metadata value Consul accepts, in bytes.
pub const META_VALUE_MAX_LEN: usize = 512;
/// Metadata key prefix Consul keeps for itself.
pub const META_RESERVED_PREFIX: &str = "consul-";
/// Largest weight Consul accepts (weights are DNS SRV weights, 16 bits).
pub const WEIGHT_MAX: u32 = 65535;
/// Longest service name that still fits one DNS label.
pub const NAME_MAX_LEN: usize = 63;
/// Longest instance ID halo accepts (Consul sets none; IDs travel in URL paths
/// and check IDs).
pub const ID_MAX_LEN: usize = 256;
/// Longest `check_ttl`: a TTL longer than this detects nothing useful.
pub const MAX_CHECK_TTL: Duration = Duration::from_secs(3600);
/// Longest `deregister_critical_after` and `drain.grace` halo accepts.
pub const MAX_LONG_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[consul]`.
    #[serde(default)]
    pub consul: ConsulSection,
    /// `[service]`: the workload.
    pub service: ServiceSection,
    /// `[[check]]`: probes of the workload.
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckSection>,
    /// `[admin]`.
    #[serde(default)]
    pub admin: AdminSection,
    /// `[drain]`.
    #[serde(default)]
    pub drain: DrainSection,
}

/// `[consul]`: the local agent, as both programs write it
/// ([`halo_consul::Section`]). A value here or in its `HALO_CONSUL_*`
/// variable wins over Consul's own `CONSUL_*` variables. The sidecar makes no
/// blocking queries, so it takes no `wait`.
pub type ConsulSection = halo_consul::Section<false>;

/// `[service]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Service name: letters, digits and `-`, at most 63 characters, so that
    /// it is a DNS label (`<name>.service.consul`).
    pub name: String,
    /// Instance ID: letters, digits and `-_.:`, at most 256 characters.
    /// Unset: `<name>-<hostname>-<port>`.
    pub id: Option<String>,
    /// Address balancers dial; not a wildcard such as `0.0.0.0` (Consul
    /// refuses those). Unset: the node's address.
    pub address: Option<String>,
    /// Port balancers dial.
    pub port: u16,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Metadata; the fault domain goes here (`zone`, `region`, `rack`). At
    /// most 64 pairs; keys of 1..128 characters from `A-Za-z0-9_-`, not
    /// starting with `consul-`; values up to 512 bytes (Consul's rules).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Weights by check state: `passing` 1..65535, `warning` 0..65535.
    /// Unset: Consul's 1/1.
    pub weights: Option<WeightsSection>,
    /// TTL of each Consul check, 1 s to 1 h. Unset: 10 s.
    #[serde(default = "default_check_ttl", with = "go_duration")]
    pub check_ttl: Duration,
    /// Consul removes the workload once the sidecar's own liveness check
    /// (`<id>:sidecar`) has been critical this long, i.e. once the sidecar has
    /// stopped heartbeating. An app check that fails does not count: a sick
    /// app stays registered, as critical. Unset: 1 m, Consul's minimum
    /// (Consul's reaper runs every 30 s, so removal takes up to 30 s more).
    #[serde(default = "default_deregister_after", with = "go_duration")]
    pub deregister_critical_after: Duration,
}

/// `weights = { passing = 10, warning = 1 }`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsSection {
    /// Weight while passing.
    pub passing: u32,
    /// Weight while warning.
    pub warning: u32,
}

/// Probe type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    /// HTTP request.
    Http,
    /// TCP connect.
    Tcp,
    /// Command, no shell.
    Exec,
}

/// `[[check]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSection {
    /// Name, unique among the checks; not `sidecar` (the liveness check's).
    pub name: String,
    /// `http`, `tcp` or `exec`.
    #[serde(rename = "type")]
    pub kind: CheckType,
    /// http: the URL.
    pub url: Option<String>,
    /// http: method. Unset: GET.
    pub method: Option<String>,
    /// http: extra headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// http: passing statuses, `"200"` or `"200-399"`. Unset: 200-399.
    pub expect_status: Option<String>,
    /// http: the body must contain this. Unset: anything.
    pub expect_body: Option<String>,
    /// tcp: `ip:port` to connect to.
    pub address: Option<String>,
    /// exec: program and arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// Time between probes. Unset: 1 s.
    #[serde(default = "default_interval", with = "go_duration")]
    pub interval: Duration,
    /// Probe deadline. Unset: 500 ms.
    #[serde(default = "default_timeout", with = "go_duration")]
    pub timeout: Duration,
    /// Random spread of the interval. Unset: a tenth of it.
    #[serde(default, with = "halo_consul::duration::serde_opt_str")]
    pub jitter: Option<Duration>,
    /// Good probes in a row to go up. Unset: 2.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failed probes in a row to go down. Unset: 2.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// `/health/live`, `/health/ready`, `/metrics`, `POST /drain`, `POST /undrain`.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// A file holding the bearer token `POST /drain` and `POST /undrain`
    /// require (`Authorization: Bearer <token>`), from any peer;
    /// owner-only mode. Read once at start (the sidecar has no reload:
    /// restart it to change the token). `HALO_ADMIN_TOKEN_FILE` sets or
    /// overrides it like every `HALO_*` variable. Unset: writes are
    /// accepted only from loopback peers.
    #[serde(default)]
    pub token_file: Option<String>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: default_admin_listen(),
            token_file: None,
        }
    }
}

/// `[drain]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainSection {
    /// Time between leaving the balancers' view and deregistering. Unset: 10 s.
    #[serde(default = "default_grace", with = "go_duration")]
    pub grace: Duration,
}

impl Default for DrainSection {
    fn default() -> Self {
        DrainSection { grace: DEFAULT_GRACE }
    }
}

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_owned()
}
fn default_grace() -> Duration {
    DEFAULT_GRACE
}
fn default_check_ttl() -> Duration {
    DEFAULT_CHECK_TTL
}
fn default_deregister_after() -> Duration {
    DEFAULT_DEREGISTER_AFTER
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}

/// Name of the sidecar's own liveness check, registered beside the app's
/// checks and always passing while the sidecar heartbeats. It alone carries
/// `deregister_critical_after`: a dead sidecar's workload leaves the catalog,
/// a sick app stays registered as critical.
pub const LIVENESS_CHECK: &str = "sidecar";

/// A checked, ready-to-run configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file (with env overrides) as read.
    pub config: Config,
    /// Instance ID (given or derived).
    pub service_id: String,
    /// Admin address.
    pub admin: SocketAddr,
    /// The admin API's write token, read from `admin.token_file`; `None`:
    /// writes from loopback only.
    pub admin_token: Option<halo_health::auth::Token>,
    /// The checks, ready for `halo_health::spawn`.
    pub checks: Vec<CheckConfig>,
    /// Things worth telling the operator that do not stop the sidecar (an
    /// ignored `HALO_*` variable). `check` prints them, `run` logs them.
    pub warnings: Vec<String>,
}

/// A config that cannot be used: every problem, each naming its field.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid config {source_name}: {}", problems.join("; "))]
pub struct ConfigError {
    /// Where it came from.
    pub source_name: String,
    /// `field: reason` each.
    pub problems: Vec<String>,
}

/// Loads `path` (if any), applies `HALO_*` variables from `env`, validates.
/// `env` is the whole environment: `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN`
/// are read from it too, to check the address the sidecar will use.
pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Settings, ConfigError> {
    let source_name = path.map_or_else(|| "(environment)".to_owned(), |p| p.display().to_string());
    let text = match path {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            problems: vec![format!("cannot read the file: {e}")],
        })?),
        None => None,
    };
    load_str(&source_name, text.as_deref(), env)
}

/// [`load`] from a file's text already read (`None`: no file), named
/// `source_name` in errors.
pub fn load_str(
    source_name: &str,
    text: Option<&str>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let fail = |problems: Vec<String>| ConfigError {
        source_name: source_name.to_owned(),
        problems,
    };
    let env: Vec<(String, String)> = env.into_iter().collect();
    let mut table: toml::Table = match text {
        Some(text) => text
            .parse()
            .map_err(|e: toml::de::Error| fail(vec![shorten_lines(&e.to_string())]))?,
        None => toml::Table::new(),
    };
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for (key, value) in &env {
        if let Some(rest) = key.strip_prefix("HALO_") {
            match overlay(&mut table, rest, value) {
                Ok(Overlay::Applied) => {}
                Ok(Overlay::NotOurs) => {
                    if let Some(section) = near_section(rest) {
                        let word_len = rest.find('_').unwrap_or(rest.len());
                        problems.push(format!(
                            "{key}: not a halo-sidecar variable; did you mean HALO_{}{}?",
                            section.to_ascii_uppercase(),
                            &rest[word_len..]
                        ));
                    } else if !OTHER_TOOLS_SWITCHES.contains(&key.as_str()) {
                        warnings.push(format!(
                            "{key}: ignored, not a halo-sidecar setting (its sections are HALO_CONSUL_, HALO_SERVICE_, HALO_CHECK_<n>_, HALO_ADMIN_, HALO_DRAIN_)"
                        ));
                    }
                }
                Err(p) => problems.push(format!("{key}: {p}")),
            }
        }
    }
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    let config: Config = match toml::Value::Table(table.clone()).try_into() {
        Ok(c) => c,
        Err(e) => return Err(fail(vec![describe(&e, &table)])),
    };
    let lookup = |name: &str| env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut settings = validate(config, lookup).map_err(fail)?;
    settings.warnings = warnings;
    Ok(settings)
}

/// A type error as `field: reason`, with the `[[check]]` index when it is in
/// a check (the deserializer reports `check.url`, not which one).
fn describe(e: &toml::de::Error, table: &toml::Table) -> String {
    let text = e.to_string();
    let text = text.trim();
    let Some((reason, path)) = text
        .rsplit_once("\nin `")
        .and_then(|(r, p)| Some((r, p.strip_suffix('`')?)))
    else {
        return shorten_lines(text);
    };
    let mut path = path.to_owned();
    if let Some(rest) = path.strip_prefix("check") {
        if let Some(toml::Value::Array(list)) = table.get("check") {
            let failing = list.iter().position(|c| CheckSection::deserialize(c.clone()).is_err());
            if let Some(i) = failing {
                path = format!("check[{i}]{rest}");
            }
        }
    }
    format!("{path}: {}", shorten_lines(reason))
}

/// One line of at most a few hundred characters.
fn shorten_lines(s: &str) -> String {
    let one_line = s
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match one_line.char_indices().nth(400) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

/// What [`overlay`] did with a variable.
enum Overlay {
    /// Set a field.
    Applied,
    /// Outside the sidecar's sections.
    NotOurs,
}

/// The section `rest` (a variable without `HALO_`) nearly names, if its first
/// word is within edit distance 2 of one but is none of them.
fn near_section(rest: &str) -> Option<&'static str> {
    let word = rest.split('_').next().unwrap_or("").to_ascii_lowercase();
    if word.is_empty() || SECTIONS.contains(&word.as_str()) {
        return None;
    }
    SECTIONS
        .iter()
        .map(|s| (edit_distance(&word, s), *s))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, s)| s)
}

/// Levenshtein distance over characters; inputs are short variable words,
/// bounded by the caller's strings (the environment).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Sets the value a `HALO_` variable (without the prefix) names.
fn overlay(table: &mut toml::Table, key: &str, raw: &str) -> Result<Overlay, String> {
    let parts: Vec<String> = key.split('_').map(str::to_ascii_lowercase).collect();
    let section = parts[0].as_str();
    match section {
        "consul" | "admin" | "drain" if parts.len() >= 2 => {
            let t = sub_table(table, section)?;
            set(t, &parts[1..].join("_"), raw);
        }
        "service" if parts.len() >= 2 => {
            let t = sub_table(table, "service")?;
            if parts[1] == "meta" && parts.len() >= 3 {
                // Metadata values are always strings ("1" stays "1").
                let inner = sub_table(t, "meta")?;
                inner.insert(parts[2..].join("_"), toml::Value::String(raw.into()));
            } else if parts[1] == "weights" && parts.len() >= 3 {
                set(sub_table(t, "weights")?, &parts[2..].join("_"), raw);
            } else {
                set(t, &parts[1..].join("_"), raw);
            }
        }
        "check" if parts.len() >= 3 => {
            let index: usize = parts[1]
                .parse()
                .map_err(|_| format!("expected HALO_CHECK_<n>_<field>, {:?} is not a number", parts[1]))?;
            if index >= MAX_CHECKS {
                return Err(format!(
                    "check index {index}: at most {MAX_CHECKS} checks (0..{})",
                    MAX_CHECKS - 1
                ));
            }
            let checks = table.entry("check").or_insert_with(|| toml::Value::Array(Vec::new()));
            let toml::Value::Array(list) = checks else {
                return Err("check is not a list of tables".into());
            };
            while list.len() <= index {
                list.push(toml::Value::Table(toml::Table::new()));
            }
            let toml::Value::Table(t) = &mut list[index] else {
                return Err(format!("check[{index}] is not a table"));
            };
            set(t, &parts[2..].join("_"), raw);
        }
        "consul" | "admin" | "drain" | "service" | "check" => {
            return Err(format!(
                "incomplete: expected HALO_{}_<field>{}",
                section.to_ascii_uppercase(),
                if section == "check" {
                    " with <n>_ before the field"
                } else {
                    ""
                }
            ))
        }
        // Not one of the sidecar's sections: another halo tool's variable
        // (HALO_NETNS_TESTS, HALO_DEMO_ONESHOT), or a typo the caller judges.
        // A typo inside a section still fails, as an unknown field.
        _ => return Ok(Overlay::NotOurs),
    }
    Ok(Overlay::Applied)
}

fn sub_table<'a>(table: &'a mut toml::Table, name: &str) -> Result<&'a mut toml::Table, String> {
    match table
        .entry(name)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    {
        toml::Value::Table(t) => Ok(t),
        _ => Err(format!("{name} is not a table")),
    }
}

fn set(table: &mut toml::Table, field: &str, raw: &str) {
    let parsed = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    let value = match (field, parsed) {
        ("tags" | "command", Some(v @ toml::Value::Array(_))) => v,
        ("tags", _) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        ),
        ("command", _) => toml::Value::Array(raw.split_whitespace().map(|s| toml::Value::String(s.into())).collect()),
        // Strings that happen to parse as numbers stay numbers; ports and
        // thresholds want that. Free-text fields (name, id, address, url)
        // are strings either way.
        ("name" | "id" | "address" | "url" | "token" | "token_file" | "listen" | "method" | "expect_body", _) => {
            toml::Value::String(raw.into())
        }
        (_, Some(v)) => v,
        (_, None) => toml::Value::String(raw.into()),
    };
    table.insert(field.to_owned(), value);
}

fn validate(config: Config, env: impl Fn(&str) -> Option<String>) -> Result<Settings, Vec<String>> {
    let mut problems = Vec::new();
    let s = &config.service;
    validate_name(&s.name, &mut problems);
    if let Some(id) = &s.id {
        validate_id("service.id", id, &mut problems);
    }
    if s.port == 0 {
        problems.push("service.port: must be 1..65535".to_owned());
    }
    match s.address.as_deref() {
        Some("") => {
            problems.push("service.address: must not be empty (leave it unset for the node's address)".to_owned())
        }
        // Consul answers 400 "Invalid service address" to these (ipaddr.IsAny).
        Some(a @ ("0.0.0.0" | "::" | "[::]")) => problems.push(format!(
            "service.address: {a:?} is a wildcard, not an address balancers can dial (Consul refuses it)"
        )),
        _ => {}
    }
    validate_meta(&s.meta, &mut problems);
    if let Some(w) = s.weights {
        if w.passing < 1 || w.passing > WEIGHT_MAX {
            problems.push(format!(
                "service.weights.passing: {} must be 1..{WEIGHT_MAX}",
                w.passing
            ));
        }
        if w.warning > WEIGHT_MAX {
            problems.push(format!(
                "service.weights.warning: {} must be 0..{WEIGHT_MAX}",
                w.warning
            ));
        }
    }
    if s.check_ttl < Duration::from_secs(1) || s.check_ttl > MAX_CHECK_TTL {
        problems.push("service.check_ttl: must be 1s..1h".to_owned());
    }
    if s.deregister_critical_after < Duration::from_secs(60) {
        problems.push("service.deregister_critical_after: Consul's minimum is 1m".to_owned());
    } else if s.deregister_critical_after > MAX_LONG_DURATION {
        problems.push("service.deregister_critical_after: at most 168h".to_owned());
    }
    if config.drain.grace > MAX_LONG_DURATION {
        problems.push("drain.grace: at most 168h".to_owned());
    }
    validate_consul(&config.consul, env, &mut problems);
    let admin = config
        .admin
        .listen
        .parse::<SocketAddr>()
        .map_err(|_| {
            problems.push(format!(
                "admin.listen: {:?} is not an ip:port address",
                config.admin.listen
            ))
        })
        .ok();
    let admin_token = match config.admin.token_file.as_deref() {
        Some("") => {
            problems.push("admin.token_file: must not be empty (leave it unset for loopback-only writes)".to_owned());
            None
        }
        Some(path) => halo_health::auth::read_token_file(Path::new(path))
            .map_err(|e| problems.push(format!("admin.token_file: {e}")))
            .ok(),
        None => None,
    };
    let mut names = std::collections::HashSet::new();
    let mut checks = Vec::new();
    for (i, c) in config.checks.iter().enumerate() {
        let at = format!("check[{i}]");
        if c.name.is_empty() || c.name.contains(char::is_whitespace) {
            problems.push(format!("{at}.name: {:?} must be non-empty, without spaces", c.name));
        } else if c.name == LIVENESS_CHECK {
            problems.push(format!(
                "{at}.name: {:?} is the name of the sidecar's own liveness check",
                c.name
            ));
        } else if !names.insert(c.name.clone()) {
            problems.push(format!("{at}.name: {:?} is used by another check", c.name));
        }
        halo_health::checker::validate_timing(&at, c.interval, c.timeout, c.rise, c.fall, &mut problems);
        if let Some(probe) = probe(c, &at, &mut problems) {
            checks.push(CheckConfig {
                name: c.name.clone(),
                probe,
                interval: c.interval,
                timeout: c.timeout,
                jitter: c.jitter.unwrap_or(c.interval / 10),
                rise: c.rise,
                fall: c.fall,
                starts_up: false,
            });
        }
    }
    let service_id = config.service.id.clone().unwrap_or_else(|| {
        let host = halo_health::host_name();
        let id = format!("{}-{host}-{}", config.service.name, config.service.port);
        validate_id(
            "service.id (unset, derived from the hostname; set it)",
            &id,
            &mut problems,
        );
        id
    });
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Settings {
        service_id,
        admin: admin.expect("checked above"),
        admin_token,
        checks,
        config,
        warnings: Vec::new(),
    })
}

fn validate_name(name: &str, problems: &mut Vec<String>) {
    if name.is_empty() {
        problems.push("service.name: must not be empty".to_owned());
    } else if name.len() > NAME_MAX_LEN || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        // Consul only warns ("will not be discoverable via DNS"), but halo-lb's
        // DNS source and every `<name>.service.consul` lookup would find nothing.
        problems.push(format!(
            "service.name: {:?} must be letters, digits and '-', at most {NAME_MAX_LEN} characters (a DNS label)",
            shorten(name)
        ));
    }
}

fn validate_id(field: &str, id: &str, problems: &mut Vec<String>) {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':');
    if id.is_empty() {
        problems.push(format!(
            "{field}: must not be empty (leave it unset for <name>-<hostname>-<port>)"
        ));
    } else if id.len() > ID_MAX_LEN || !id.bytes().all(allowed) {
        problems.push(format!(
            "{field}: {:?} must be letters, digits and '-_.:', at most {ID_MAX_LEN} characters",
            shorten(id)
        ));
    }
}

/// Consul's `ValidateServiceMetadata` for a typical service.
fn validate_meta(meta: &BTreeMap<String, String>, problems: &mut Vec<String>) {
    if meta.len() > META_MAX_PAIRS {
        problems.push(format!(
            "service.meta: {} pairs, Consul allows at most {META_MAX_PAIRS}",
            meta.len()
        ));
    }
    for (key, value) in meta {
        let at = format!("service.meta.{}", shorten(key));
        if key.is_empty() {
            problems.push("service.meta: a key is empty".to_owned());
        } else if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            problems.push(format!("{at}: the key may hold only letters, digits, '-' and '_'"));
        } else if key.len() > META_KEY_MAX_LEN {
            problems.push(format!("{at}: the key is longer than {META_KEY_MAX_LEN} characters"));
        } else if key.starts_with(META_RESERVED_PREFIX) {
            problems.push(format!(
                "{at}: the prefix {META_RESERVED_PREFIX:?} is reserved by Consul"
            ));
        }
        if value.len() > META_VALUE_MAX_LEN {
            problems.push(format!(
                "{at}: the value is {} bytes, Consul allows at most {META_VALUE_MAX_LEN}",
                value.len()
            ));
        }
    }
}

/// The Consul settings as the client will see them (config first, then
/// Consul's `CONSUL_*` variables), checked by the client itself so `check`
/// and `run` agree; each problem names the key (`consul.<key>`) or the
/// variable at fault.
fn validate_consul(consul: &ConsulSection, env: impl Fn(&str) -> Option<String>, problems: &mut Vec<String>) {
    problems.extend(consul.problems(env).into_iter().map(|p| shorten(&p)));
}

/// At most 100 characters of `s` (user strings copied into errors).
fn shorten(s: &str) -> String {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

fn probe(c: &CheckSection, at: &str, problems: &mut Vec<String>) -> Option<Probe> {
    match c.kind {
        CheckType::Http => {
            let Some(url) = &c.url else {
                problems.push(format!("{at}.url: required for type = \"http\""));
                return None;
            };
            let uri: http::Uri = match url.parse() {
                Ok(u) => u,
                Err(e) => {
                    problems.push(format!("{at}.url: {url:?} is not a URL: {e}"));
                    return None;
                }
            };
            if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                problems.push(format!("{at}.url: {url:?} must be http://host:port/path"));
                return None;
            }
            let method = match c.method.as_deref().unwrap_or("GET").parse::<http::Method>() {
                Ok(m) => m,
                Err(_) => {
                    problems.push(format!("{at}.method: {:?} is not an HTTP method", c.method));
                    return None;
                }
            };
            let mut headers = Vec::new();
            for (k, v) in &c.headers {
                match (k.parse::<http::HeaderName>(), v.parse::<http::HeaderValue>()) {
                    (Ok(k), Ok(v)) => headers.push((k, v)),
                    _ => problems.push(format!("{at}.headers.{k}: not a valid header")),
                }
            }
            let expect_status = match parse_status_range(c.expect_status.as_deref().unwrap_or("200-399")) {
                Some(r) => r,
                None => {
                    problems.push(format!(
                        "{at}.expect_status: {:?} is not a status or range like \"200-399\"",
                        c.expect_status
                    ));
                    return None;
                }
            };
            Some(Probe::Http(HttpProbe {
                url: uri,
                method,
                headers,
                expect_status,
                expect_body: c.expect_body.clone(),
            }))
        }
        CheckType::Tcp => match c.address.as_deref().map(str::parse::<SocketAddr>) {
            Some(Ok(a)) => Some(Probe::Tcp(a)),
            Some(Err(_)) => {
                problems.push(format!("{at}.address: {:?} is not an ip:port address", c.address));
                None
            }
            None => {
                problems.push(format!("{at}.address: required for type = \"tcp\""));
                None
            }
        },
        CheckType::Exec => {
            if c.command.is_empty() || c.command[0].is_empty() {
                problems.push(format!(
                    "{at}.command: required for type = \"exec\" (program and arguments)"
                ));
                return None;
            }
            Some(Probe::Exec(ExecProbe {
                command: c.command.clone(),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn everything_can_come_from_the_environment() {
        let s = load(
            None,
            env(&[
                ("HALO_SERVICE_NAME", "web"),
                ("HALO_SERVICE_ID", "web-1"),
                ("HALO_SERVICE_PORT", "9001"),
                ("HALO_SERVICE_TAGS", "v1, blue"),
                ("HALO_SERVICE_META_ZONE", "zone-a"),
                ("HALO_SERVICE_WEIGHTS_PASSING", "10"),
                ("HALO_SERVICE_WEIGHTS_WARNING", "1"),
                ("HALO_CHECK_0_NAME", "http"),
                ("HALO_CHECK_0_TYPE", "http"),
                ("HALO_CHECK_0_URL", "http://127.0.0.1:9001/healthz"),
                ("HALO_CHECK_0_INTERVAL", "2s"),
                ("HALO_CHECK_1_NAME", "script"),
                ("HALO_CHECK_1_TYPE", "exec"),
                ("HALO_CHECK_1_COMMAND", "/bin/true --flag"),
                ("HALO_ADMIN_LISTEN", "127.0.0.1:19902"),
                ("HALO_DRAIN_GRACE", "3s"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(s.service_id, "web-1");
        assert_eq!(s.config.service.port, 9001);
        assert_eq!(s.config.service.tags, ["v1", "blue"]);
        assert_eq!(s.config.service.meta["zone"], "zone-a");
        assert_eq!(s.config.service.weights.unwrap().passing, 10);
        assert_eq!(s.checks.len(), 2);
        assert_eq!(s.checks[0].interval, Duration::from_secs(2));
        let Probe::Exec(e) = &s.checks[1].probe else { panic!() };
        assert_eq!(e.command, ["/bin/true", "--flag"]);
        assert_eq!(s.admin, "127.0.0.1:19902".parse().unwrap());
        assert_eq!(s.config.drain.grace, Duration::from_secs(3));
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "[service]\nname = \"web\"\nport = 1\n").unwrap();
        let s = load(Some(&path), env(&[("HALO_SERVICE_PORT", "2")])).unwrap();
        assert_eq!(s.config.service.port, 2);
        assert!(
            s.service_id.starts_with("web-") && s.service_id.ends_with("-2"),
            "{}",
            s.service_id
        );
    }

    #[test]
    fn halo_admin_token_file_is_admin_token_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "[service]\nname = \"web\"\nport = 1\n[admin]\ntoken_file = \"/nonexistent/file\"\n",
        )
        .unwrap();
        let base = [("HALO_ADMIN_TOKEN_FILE", token.to_str().unwrap())];
        let s = load(Some(&path), env(&base)).unwrap();
        assert!(
            s.admin_token.unwrap().matches(b"t0ken"),
            "the variable overrides the file"
        );
        // A path that looks like a number stays a path.
        let e = load(
            None,
            env(&[
                ("HALO_SERVICE_NAME", "web"),
                ("HALO_SERVICE_PORT", "1"),
                ("HALO_ADMIN_TOKEN_FILE", "123"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("admin.token_file: cannot read 123"), "{e}");
        let e = load(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(e.contains("admin.token_file: cannot read /nonexistent/file"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = load(
            None,
            env(&[("HALO_SERVICE_NAME", "web"), ("HALO_SERVICE_PORT", "http")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("port"), "{e}");
        let e = load(
            None,
            env(&[
                ("HALO_SERVICE_NAME", "web"),
                ("HALO_SERVICE_PORT", "80"),
                ("HALO_CHECK_0_NAME", "c"),
                ("HALO_CHECK_0_TYPE", "http"),
                ("HALO_CHECK_0_URL", "ftp://x"),
                ("HALO_CHECK_1_NAME", "t"),
                ("HALO_CHECK_1_TYPE", "tcp"),
                ("HALO_CHECK_1_RISE", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        for needle in ["check[0].url", "check[1].address: required", "check[1].rise"] {
            assert!(e.contains(needle), "missing {needle} in {e}");
        }
        let e = load(None, env(&[("HALO_SERVICE_PROT", "1")])).unwrap_err().to_string();
        assert!(e.contains("prot"), "a typo inside a section is named: {e}");
        let e = load(None, env(&[("HALO_CHECK_X", "1")])).unwrap_err().to_string();
        assert!(e.contains("HALO_CHECK_X"), "{e}");
        // Other tools' variables are not the sidecar's business.
        let base = [("HALO_SERVICE_NAME", "web"), ("HALO_SERVICE_PORT", "80")];
        let mut with_other = base.to_vec();
        with_other.push(("HALO_NETNS_TESTS", "1"));
        let (plain, other) = (load(None, env(&base)).unwrap(), load(None, env(&with_other)).unwrap());
        assert_eq!(format!("{plain:?}"), format!("{other:?}"));
    }

    fn problems_of(pairs: &[(&str, &str)]) -> String {
        let mut all = vec![("HALO_SERVICE_NAME", "web"), ("HALO_SERVICE_PORT", "80")];
        all.extend_from_slice(pairs);
        match load(None, env(&all)) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn what_consul_would_refuse_is_refused_here_naming_field_and_reason() {
        let long_key = "k".repeat(META_KEY_MAX_LEN + 1);
        let long_value = "v".repeat(META_VALUE_MAX_LEN + 1);
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![("HALO_SERVICE_META_CONSUL-VERSION", "1")],
                "service.meta.consul-version: the prefix \"consul-\" is reserved",
            ),
            (
                vec![("HALO_SERVICE_META_ZONE.A", "1")],
                "service.meta.zone.a: the key may hold only",
            ),
            (
                vec![("HALO_SERVICE_META_ZONE", &long_value)],
                "service.meta.zone: the value is 513 bytes",
            ),
            (
                vec![
                    ("HALO_SERVICE_WEIGHTS_PASSING", "0"),
                    ("HALO_SERVICE_WEIGHTS_WARNING", "1"),
                ],
                "service.weights.passing: 0 must be 1..65535",
            ),
            (
                vec![
                    ("HALO_SERVICE_WEIGHTS_PASSING", "70000"),
                    ("HALO_SERVICE_WEIGHTS_WARNING", "1"),
                ],
                "service.weights.passing: 70000",
            ),
            (
                vec![
                    ("HALO_SERVICE_WEIGHTS_PASSING", "1"),
                    ("HALO_SERVICE_WEIGHTS_WARNING", "65536"),
                ],
                "service.weights.warning: 65536",
            ),
            (
                vec![("HALO_CONSUL_TOKEN_FILE", "/nonexistent/halo-token")],
                "consul.token_file: /nonexistent/halo-token: No such file",
            ),
            (
                vec![("CONSUL_HTTP_TOKEN_FILE", "/nonexistent/halo-token")],
                "CONSUL_HTTP_TOKEN_FILE: /nonexistent/halo-token: No such file",
            ),
            (
                vec![
                    ("HALO_CONSUL_ADDRESS", "https://127.0.0.1:8501"),
                    ("HALO_CONSUL_CA_FILE", "/nonexistent/ca.pem"),
                ],
                "consul.ca_file /nonexistent/ca.pem: No such file",
            ),
            (
                vec![
                    ("HALO_CONSUL_ADDRESS", "https://127.0.0.1:8501"),
                    ("CONSUL_CACERT", "/nonexistent/ca.pem"),
                ],
                "CONSUL_CACERT /nonexistent/ca.pem: No such file",
            ),
            (
                vec![("HALO_CONSUL_KEY_FILE", "/x.pem")],
                "consul.key_file (CONSUL_CLIENT_KEY) is set but cert_file (CONSUL_CLIENT_CERT) is not",
            ),
            (
                vec![("HALO_SERVICE_ADDRESS", "0.0.0.0")],
                "service.address: \"0.0.0.0\" is a wildcard",
            ),
            (
                vec![("HALO_SERVICE_ADDRESS", "::")],
                "service.address: \"::\" is a wildcard",
            ),
            (
                vec![("HALO_SERVICE_NAME", "my_web")],
                "service.name: \"my_web\" must be letters, digits and '-'",
            ),
            (
                vec![("HALO_SERVICE_ID", "web/1")],
                "service.id: \"web/1\" must be letters",
            ),
            (vec![("HALO_SERVICE_ID", "")], "service.id: must not be empty"),
            (
                vec![("HALO_CONSUL_ADDRESS", "ftp://127.0.0.1:8500")],
                "consul.address: ",
            ),
            (vec![("CONSUL_HTTP_ADDR", "127.0.0.1:8500/x")], "CONSUL_HTTP_ADDR: "),
            (
                vec![
                    ("HALO_CHECK_0_NAME", "sidecar"),
                    ("HALO_CHECK_0_TYPE", "tcp"),
                    ("HALO_CHECK_0_ADDRESS", "127.0.0.1:1"),
                ],
                "check[0].name: \"sidecar\" is the name of the sidecar's own liveness check",
            ),
            (
                vec![("HALO_SERVICE_CHECK_TTL", "2h")],
                "service.check_ttl: must be 1s..1h",
            ),
        ];
        for (pairs, want) in cases {
            let e = problems_of(&pairs);
            assert!(e.contains(want), "{pairs:?}: want {want:?} in {e:?}");
        }
        // The key length is counted like Consul counts it, and the message is
        // bounded even for a huge key.
        let e = problems_of(&[(&format!("HALO_SERVICE_META_{long_key}"), "1")]);
        assert!(e.contains("the key is longer than 128 characters"), "{e}");
        let huge = "x".repeat(100_000);
        let e = problems_of(&[("HALO_SERVICE_ID", &huge)]);
        assert!(e.contains("service.id") && e.len() < 1000, "{}", e.len());

        let many: Vec<(String, String)> = (0..=META_MAX_PAIRS)
            .map(|i| (format!("HALO_SERVICE_META_K{i}"), "v".to_owned()))
            .collect();
        let pairs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let e = problems_of(&pairs);
        assert!(e.contains("service.meta: 65 pairs, Consul allows at most 64"), "{e}");

        // At the limits, all is well.
        let at_limit = "k".repeat(META_KEY_MAX_LEN);
        let value = "v".repeat(META_VALUE_MAX_LEN);
        let e = problems_of(&[
            (&format!("HALO_SERVICE_META_{at_limit}"), value.as_str()),
            ("HALO_SERVICE_WEIGHTS_PASSING", "65535"),
            ("HALO_SERVICE_WEIGHTS_WARNING", "0"),
            ("HALO_SERVICE_ID", "web-1.host_a:9001"),
            ("HALO_CONSUL_ADDRESS", "http://127.0.0.1:8500"),
        ]);
        assert_eq!(e, "");
    }

    #[test]
    fn foreign_halo_variables_warn_and_near_misses_fail() {
        let base = [("HALO_SERVICE_NAME", "web"), ("HALO_SERVICE_PORT", "80")];
        let with = |extra: (&'static str, &'static str)| {
            let mut v = base.to_vec();
            v.push(extra);
            load(None, env(&v))
        };
        let s = with(("HALO_NETNS_TESTS", "1")).unwrap();
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        let s = with(("HALO_FROBNICATE", "1")).unwrap();
        assert_eq!(s.warnings.len(), 1);
        assert!(
            s.warnings[0].starts_with("HALO_FROBNICATE: ignored"),
            "{:?}",
            s.warnings
        );
        for (var, want) in [
            ("HALO_SERVIC_PORT", "did you mean HALO_SERVICE_PORT?"),
            ("HALO_SERVCE_META_ZONE", "did you mean HALO_SERVICE_META_ZONE?"),
            ("HALO_CHEK_0_URL", "did you mean HALO_CHECK_0_URL?"),
            ("HALO_ADMN_LISTEN", "did you mean HALO_ADMIN_LISTEN?"),
            ("HALO_DRIAN_GRACE", "did you mean HALO_DRAIN_GRACE?"),
            ("HALO_CONSL_ADDRESS", "did you mean HALO_CONSUL_ADDRESS?"),
        ] {
            let e = with((var, "1")).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains(want), "{var}: {e}");
        }
        let e = with(("HALO_CHECK_64_NAME", "x")).unwrap_err().to_string();
        assert!(
            e.contains("HALO_CHECK_64_NAME: check index 64: at most 64 checks"),
            "{e}"
        );
    }

    #[test]
    fn type_errors_name_the_field_and_the_check() {
        let text = "[service]\nname = \"web\"\nport = 80\n[[check]]\nname = \"a\"\ntype = \"tcp\"\naddress = \"127.0.0.1:1\"\n[[check]]\nname = \"b\"\ntype = \"tcp\"\naddress = \"127.0.0.1:1\"\ninterval = 5\n";
        let e = load_str("t", Some(text), Vec::new()).unwrap_err();
        assert_eq!(
            e.problems,
            ["check[1].interval: invalid type: integer `5`, expected a string"]
        );
        let e = load_str("t", Some("[service]\nname = \"web\"\nport = 99999999\n"), Vec::new()).unwrap_err();
        assert_eq!(
            e.problems,
            ["service.port: invalid value: integer `99999999`, expected u16"]
        );
        let e = load_str("t", Some("[service]\nname = \"web\"\nport = 1e400\n"), Vec::new()).unwrap_err();
        assert!(e.problems[0].starts_with("TOML parse error at line 3, column 8"), "{e}");
        assert!(!e.problems[0].contains('\n'), "one line: {e}");
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("servic", "service"), 1);
        assert_eq!(edit_distance("drian", "drain"), 2);
        assert_eq!(edit_distance("", "admin"), 5);
        assert_eq!(edit_distance("netns", "consul"), 5);
        assert_eq!(near_section("NETNS_TESTS"), None);
        assert_eq!(near_section("DEMO_ONESHOT"), None);
        assert_eq!(near_section("LB_BIN"), None);
        assert_eq!(near_section("IT_FLOATING_HELPER"), None);
        assert_eq!(near_section("SERVICE_PORT"), None);
        assert_eq!(near_section("SERVIC_PORT"), Some("service"));
    }

    #[test]
    fn status_ranges() {
        assert_eq!(parse_status_range("200"), Some(200..=200));
        assert_eq!(parse_status_range("200-399"), Some(200..=399));
        assert_eq!(parse_status_range("399-200"), None);
        assert_eq!(parse_status_range("ok"), None);
    }
}

/// Keep-it-away property tests of the loader: random text and random
/// mutations of the shipped examples never panic, and every error names a
/// field or a line. 256 cases each by default (a few seconds in CI);
/// `PROPTEST_CASES=100000 cargo test -p halo-sidecar --lib fuzz` for a long run.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    const EXAMPLES: &[&str] = &[
        include_str!("../../packaging/examples/sidecar.toml"),
        include_str!("../../packaging/examples/demo/sidecar-1.toml"),
        include_str!("../../packaging/examples/demo/sidecar-2.toml"),
        include_str!("../../packaging/examples/demo/sidecar-3.toml"),
    ];

    /// Where an error may say the problem is: the first word of its
    /// `field: reason` prefix.
    const PLACES: &[&str] = &["consul", "service", "check", "admin", "drain", "HALO_", "CONSUL_HTTP_"];

    /// The problem names a line ("TOML parse error at line 3") or starts with
    /// a field path (`service.port: …`, `check[1].url: …`, `HALO_X: …`) or
    /// names a top-level section in backquotes (missing field `service`).
    fn names_a_place(p: &str) -> bool {
        if p.contains("at line ") {
            return true;
        }
        if let Some((field, _)) = p.split_once(": ") {
            if PLACES.iter().any(|place| field.starts_with(place)) && !field.contains(' ') || field.starts_with("HALO_")
            {
                return true;
            }
        }
        PLACES.iter().any(|place| p.contains(&format!("`{place}`")))
    }

    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
    }

    /// Loads `text` as a file; panics (failing the case) if an error names
    /// neither a field nor a line.
    fn check(text: &str) {
        if let Err(e) = load_str("fuzz.toml", Some(text), Vec::new()) {
            assert!(!e.problems.is_empty(), "an error without problems");
            for p in &e.problems {
                assert!(names_a_place(p), "names no field or line: {p:?}\n--- input ---\n{text}");
            }
        }
    }

    /// Values of the wrong type or out of any range.
    fn wild_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"x\"".to_owned()),
            Just("-1".to_owned()),
            Just("0".to_owned()),
            Just("99999999999999999999999".to_owned()),
            Just("18446744073709551616".to_owned()),
            Just("1e400".to_owned()),
            Just("nan".to_owned()),
            Just("true".to_owned()),
            Just("[1, \"a\", []]".to_owned()),
            Just("{ a = 1 }".to_owned()),
            Just("\"99999999999999h\"".to_owned()),
            Just("\"1ns\"".to_owned()),
            Just("\"0.0.0.0\"".to_owned()),
            Just("1979-05-27T07:32:00Z".to_owned()),
            "\\PC{0,20}".prop_map(|s| format!("{s:?}")),
            any::<i64>().prop_map(|n| n.to_string()),
        ]
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Drop(usize),
        Duplicate(usize),
        Swap(usize, usize),
        Garble(usize, usize, String),
        Retype(usize, String),
        Insert(usize, String),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            any::<usize>().prop_map(Mutation::Drop),
            any::<usize>().prop_map(Mutation::Duplicate),
            (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
            (any::<usize>(), any::<usize>(), "\\PC{0,8}").prop_map(|(l, at, s)| Mutation::Garble(l, at, s)),
            (any::<usize>(), wild_value()).prop_map(|(l, v)| Mutation::Retype(l, v)),
            (any::<usize>(), "[a-z_\\[\\]=\" .0-9]{0,30}").prop_map(|(l, s)| Mutation::Insert(l, s)),
        ]
    }

    fn apply(lines: &mut Vec<String>, m: &Mutation) {
        if lines.is_empty() {
            return;
        }
        let n = lines.len();
        match m {
            Mutation::Drop(i) => {
                lines.remove(i % n);
            }
            Mutation::Duplicate(i) => {
                let line = lines[i % n].clone();
                lines.insert(i % n, line);
            }
            Mutation::Swap(a, b) => lines.swap(a % n, b % n),
            Mutation::Garble(i, at, junk) => {
                let line = &mut lines[i % n];
                let chars: Vec<char> = line.chars().collect();
                let at = at % (chars.len() + 1);
                let end = (at + junk.chars().count()).min(chars.len());
                let garbled: String = chars[..at]
                    .iter()
                    .chain(junk.chars().collect::<Vec<_>>().iter())
                    .chain(chars[end..].iter())
                    .collect();
                *line = garbled;
            }
            Mutation::Retype(i, value) => {
                let line = &mut lines[i % n];
                if let Some((key, _)) = line.split_once('=') {
                    *line = format!("{key}= {value}");
                }
            }
            Mutation::Insert(i, text) => lines.insert(i % n, text.clone()),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

        #[test]
        fn random_text_never_panics_and_errors_name_a_field_or_line(text in "\\PC{0,200}") {
            check(&text);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            check(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn mutated_examples_never_panic_and_errors_name_a_field_or_line(
            example in 0..EXAMPLES.len(),
            mutations in proptest::collection::vec(mutation(), 1..6),
        ) {
            let mut lines: Vec<String> = EXAMPLES[example].lines().map(str::to_owned).collect();
            for m in &mutations {
                apply(&mut lines, m);
            }
            check(&lines.join("\n"));
        }

        #[test]
        fn random_environments_never_panic(
            vars in proptest::collection::vec(("HALO_[A-Z0-9_]{0,24}", "\\PC{0,16}"), 0..8),
        ) {
            let env: Vec<(String, String)> = vars;
            if let Err(e) = load_str("fuzz.toml", Some(EXAMPLES[0]), env.clone()) {
                for p in &e.problems {
                    prop_assert!(names_a_place(p), "names no field: {p:?} for {env:?}");
                }
            }
        }
    }
}
