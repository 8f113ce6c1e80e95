//! halo-sidecar's configuration: a TOML file, every field of which can also
//! be set (or overridden) by a `HALO_*` environment variable.
//!
//! Variables map onto the file's structure: `HALO_SERVICE_PORT=9001` is
//! `[service] port = 9001`, `HALO_SERVICE_META_ZONE=zone-a` is
//! `[service.meta] zone = "zone-a"`, `HALO_CHECK_0_URL=...` is the first
//! `[[check]]`'s `url`. Values are read as TOML when they parse as such
//! (numbers, booleans, arrays) and as strings otherwise; `tags` and `command`
//! also take comma- or space-separated lists. Variables outside the
//! sidecar's sections (`HALO_NETNS_TESTS`, `HALO_DEMO_ONESHOT`) belong to
//! other halo tools and are ignored; an unknown field inside a section is an
//! error.

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

/// `[consul]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSection {
    /// The local agent. Unset: `CONSUL_HTTP_ADDR`, else 127.0.0.1:8500.
    pub address: Option<String>,
    /// ACL token. Unset: `CONSUL_HTTP_TOKEN`, else none.
    pub token: Option<String>,
}

/// `[service]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Service name.
    pub name: String,
    /// Instance ID. Unset: `<name>-<hostname>-<port>`.
    pub id: Option<String>,
    /// Address balancers dial. Unset: the node's address.
    pub address: Option<String>,
    /// Port balancers dial.
    pub port: u16,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Metadata; the fault domain goes here (`zone`, `region`, `rack`).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Weights by check state. Unset: Consul's 1/1.
    pub weights: Option<WeightsSection>,
    /// TTL of each Consul check. Unset: 10 s.
    #[serde(default = "default_check_ttl", with = "go_duration")]
    pub check_ttl: Duration,
    /// Consul removes the workload once a check has been critical this long
    /// (a sidecar that died stops heartbeating). Unset: 1 m, Consul's minimum.
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
    /// Name, unique among the checks.
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
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: default_admin_listen(),
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

/// A checked, ready-to-run configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file (with env overrides) as read.
    pub config: Config,
    /// Instance ID (given or derived).
    pub service_id: String,
    /// Admin address.
    pub admin: SocketAddr,
    /// The checks, ready for `halo_health::spawn`.
    pub checks: Vec<CheckConfig>,
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
pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Settings, ConfigError> {
    let source_name = path.map_or_else(|| "(environment)".to_owned(), |p| p.display().to_string());
    let fail = |problems: Vec<String>| ConfigError {
        source_name: source_name.clone(),
        problems,
    };
    let mut table: toml::Table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| fail(vec![format!("cannot read the file: {e}")]))?;
            text.parse()
                .map_err(|e: toml::de::Error| fail(vec![e.to_string().trim().to_owned()]))?
        }
        None => toml::Table::new(),
    };
    let mut problems = Vec::new();
    for (key, value) in env {
        if let Some(rest) = key.strip_prefix("HALO_") {
            if let Err(p) = overlay(&mut table, rest, &value) {
                problems.push(format!("{key}: {p}"));
            }
        }
    }
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    let config: Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| fail(vec![e.to_string().trim().to_owned()]))?;
    validate(config).map_err(fail)
}

/// Sets the value a `HALO_` variable (without the prefix) names.
fn overlay(table: &mut toml::Table, key: &str, raw: &str) -> Result<(), String> {
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
        // (HALO_NETNS_TESTS, HALO_DEMO_ONESHOT), not ours to judge. A typo
        // inside a section still fails, as an unknown field.
        _ => {}
    }
    Ok(())
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
        ("name" | "id" | "address" | "url" | "token" | "listen" | "method" | "expect_body", _) => {
            toml::Value::String(raw.into())
        }
        (_, Some(v)) => v,
        (_, None) => toml::Value::String(raw.into()),
    };
    table.insert(field.to_owned(), value);
}

fn validate(config: Config) -> Result<Settings, Vec<String>> {
    let mut problems = Vec::new();
    let s = &config.service;
    if s.name.is_empty() {
        problems.push("service.name: must not be empty".to_owned());
    }
    if s.port == 0 {
        problems.push("service.port: must be 1..65535".to_owned());
    }
    if s.address.as_deref() == Some("") {
        problems.push("service.address: must not be empty (leave it unset for the node's address)".to_owned());
    }
    if s.check_ttl < Duration::from_secs(1) {
        problems.push("service.check_ttl: must be at least 1s".to_owned());
    }
    if s.deregister_critical_after < Duration::from_secs(60) {
        problems.push("service.deregister_critical_after: Consul's minimum is 1m".to_owned());
    }
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
    let mut names = std::collections::HashSet::new();
    let mut checks = Vec::new();
    for (i, c) in config.checks.iter().enumerate() {
        let at = format!("check[{i}]");
        if c.name.is_empty() || c.name.contains(char::is_whitespace) {
            problems.push(format!("{at}.name: {:?} must be non-empty, without spaces", c.name));
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
    if !problems.is_empty() {
        return Err(problems);
    }
    let service_id = config.service.id.clone().unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        format!("{}-{host}-{}", config.service.name, config.service.port)
    });
    Ok(Settings {
        service_id,
        admin: admin.expect("checked above"),
        checks,
        config,
    })
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

    #[test]
    fn status_ranges() {
        assert_eq!(parse_status_range("200"), Some(200..=200));
        assert_eq!(parse_status_range("200-399"), Some(200..=399));
        assert_eq!(parse_status_range("399-200"), None);
        assert_eq!(parse_status_range("ok"), None);
    }
}
