//! [`Config::validate`]: from the file as written to the settings the
//! balancer runs with, reporting every problem at once, each named by its
//! field.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::ha::validate_ha;
use super::{
    listens_conflict, Backend, BackendSource, BackendSpec, CheckSpec, Config, ConsulConfig, ConsulSettings,
    ConsulTarget, DataPlane, DnsTarget, HaMode, Protocol, ProxyProtocol, UdpSettings, Validated, ValidatedVip,
    VipConfig, VipSettings, ZonePolicy, DEFAULT_CONSUL_WAIT, DEFAULT_UDP_IDLE_TIMEOUT, DEFAULT_WEIGHT, MAX_WORKERS,
};

impl Config {
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
        let admin_token = admin_token(self.admin.token_file.as_deref(), &mut problems);
        if let Some(w) = self.workers.filter(|w| !(1..=MAX_WORKERS).contains(w)) {
            problems.push(format!("workers: {w} is not in 1..={MAX_WORKERS}"));
        }
        let data_plane = data_plane(self.data_plane, &mut problems);
        if self.vips.is_empty() {
            problems.push("vip: at least one [[vip]] is required".to_owned());
        }
        let vips = validate_vips(&self.vips, admin, self.zone.as_deref(), &mut problems);
        validate_zone(self.zone.as_deref(), &mut problems);
        let needs_consul = self.ha.is_some() || self.vips.iter().any(|v| v.service.is_some());
        let consul = validate_consul(&self.consul, needs_consul, &mut problems);
        let ha = self.ha.as_ref().and_then(|ha| validate_ha(ha, admin, &mut problems));
        if self.ha.as_ref().is_some_and(|ha| ha.mode == HaMode::Ecmp) {
            // An ECMP instance announces each VIP by its address.
            for vip in &vips {
                let i = self.vips.iter().position(|v| v.name == vip.name).unwrap_or_default();
                let ip = vip.listen.ip();
                if ip.is_unspecified() || ip.is_loopback() {
                    problems.push(format!(
                        "vip[{i}].listen: {} cannot be announced with ha.mode = \"ecmp\"; listen on the VIP's own address",
                        vip.listen
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Validated {
            admin: admin.expect("checked above"),
            admin_token,
            drain_timeout: self.drain_timeout,
            workers: self.workers,
            data_plane,
            consul,
            vips,
            ha,
        })
    }
}

/// The admin write token: from `admin.token_file`, else from the file
/// `HALO_ADMIN_TOKEN_FILE` names; `None` when neither is set. A problem
/// names whichever of the two was used, never the token.
fn admin_token(token_file: Option<&str>, problems: &mut Vec<String>) -> Option<halo_health::auth::Token> {
    use halo_health::auth::{read_token_file, TOKEN_FILE_ENV};
    let (field, path) = match token_file {
        Some(path) => ("admin.token_file", path.to_owned()),
        None => (TOKEN_FILE_ENV, std::env::var(TOKEN_FILE_ENV).ok()?),
    };
    if path.is_empty() {
        problems.push(format!(
            "{field}: must not be empty (leave it unset for loopback-only writes)"
        ));
        return None;
    }
    read_token_file(std::path::Path::new(&path))
        .map_err(|e| problems.push(format!("{field}: {e}")))
        .ok()
}

/// The environment variable that overrides the file's `data_plane`: an
/// operator's way to change it without editing the file (and the tests'
/// way to run every data-plane test on each).
pub(crate) const DATA_PLANE_ENV: &str = "HALO_DATA_PLANE";

/// `data_plane`, or [`DATA_PLANE_ENV`] when set.
fn data_plane(file: DataPlane, problems: &mut Vec<String>) -> DataPlane {
    let Ok(value) = std::env::var(DATA_PLANE_ENV) else {
        return file;
    };
    match value.as_str() {
        "auto" => DataPlane::Auto,
        "io_uring" => DataPlane::IoUring,
        "epoll" => DataPlane::Epoll,
        other => {
            problems.push(format!(
                "{DATA_PLANE_ENV}: {other:?} is not one of \"auto\", \"io_uring\", \"epoll\""
            ));
            file
        }
    }
}

/// Every `[[vip]]`, and what must hold between them: unique names, listen
/// addresses that can all be bound, none on the admin address.
fn validate_vips(
    configs: &[VipConfig],
    admin: Option<SocketAddr>,
    zone: Option<&str>,
    problems: &mut Vec<String>,
) -> Vec<ValidatedVip> {
    let mut names = HashSet::new();
    // Each protocol has its own ports: a TCP and a UDP VIP may share one.
    let mut listens: Vec<(SocketAddr, Protocol)> = Vec::new();
    let mut vips = Vec::new();
    for (i, vip) in configs.iter().enumerate() {
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
                let protocol = vip.protocol;
                if let Some((other, _)) = listens.iter().find(|&&(b, p)| p == protocol && listens_conflict(a, b)) {
                    let p = protocol.as_str();
                    problems.push(if *other == a {
                        format!("{at}.listen: {a} is used by another {p} vip")
                    } else {
                        format!("{at}.listen: {a} overlaps {other} of another {p} vip (a wildcard address takes the port on every address of its family)")
                    });
                }
                listens.push((a, protocol));
                if let Some(admin) = admin.filter(|&b| protocol == Protocol::Tcp && listens_conflict(a, b)) {
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
        let source = validate_source(&at, vip, problems);
        let settings = validate_vip_settings(&at, vip, zone, problems);
        if let (Some(listen), Some(source), Some(settings)) = (listen, source, settings) {
            vips.push(ValidatedVip {
                name: vip.name.clone(),
                listen,
                protocol: vip.protocol,
                backlog: vip.backlog,
                settings,
                source,
            });
        }
    }
    vips
}

/// What a VIP's connections read from its table: timeouts, limits, the
/// passive policy, the zone policy and the active check.
fn validate_vip_settings(
    at: &str,
    vip: &VipConfig,
    zone: Option<&str>,
    problems: &mut Vec<String>,
) -> Option<VipSettings> {
    let before = problems.len();
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
    let udp = validate_udp(at, vip, problems);
    let zone = validate_zone_routing(at, vip, zone, problems);
    let check = vip
        .check
        .as_ref()
        .and_then(|c| CheckSpec::from_config(c, &format!("{at}.check"), problems));
    (problems.len() == before).then_some(VipSettings {
        algorithm: vip.algorithm,
        connect_timeout: vip.connect_timeout,
        idle_timeout: vip.idle_timeout,
        max_connections: vip.max_connections,
        proxy_protocol: vip.proxy_protocol,
        copy: vip.copy,
        retries: vip.retries,
        passive: vip.passive,
        zone,
        check,
        udp,
    })
}

/// The UDP fields: set only on a UDP VIP, and sane there; PROXY v1 has no
/// UDP form.
fn validate_udp(at: &str, vip: &VipConfig, problems: &mut Vec<String>) -> UdpSettings {
    let udp_only = [
        ("udp_idle_timeout", vip.udp_idle_timeout.is_some()),
        ("udp_responses", vip.udp_responses.is_some()),
    ];
    if vip.protocol != Protocol::Udp {
        for (field, set) in udp_only {
            if set {
                problems.push(format!("{at}.{field}: only for protocol = \"udp\""));
            }
        }
        return UdpSettings::default();
    }
    if vip.udp_idle_timeout.is_some_and(|d| d.is_zero()) {
        problems.push(format!("{at}.udp_idle_timeout: must be above zero"));
    }
    if vip.udp_responses == Some(0) {
        problems.push(format!(
            "{at}.udp_responses: must be at least 1 (leave it unset for flows that end only when idle)"
        ));
    }
    if vip.proxy_protocol == ProxyProtocol::V1 {
        problems.push(format!(
            "{at}.proxy_protocol: \"v1\" has no form for UDP; use \"v2\" (its DGRAM form, a header in front of every datagram)"
        ));
    }
    UdpSettings {
        idle_timeout: vip.udp_idle_timeout.unwrap_or(DEFAULT_UDP_IDLE_TIMEOUT),
        responses: vip.udp_responses,
    }
}

/// Exactly one of `backends`, `service` and `dns`, and that one valid; a
/// problem names the field that is one too many.
fn validate_source(at: &str, vip: &VipConfig, problems: &mut Vec<String>) -> Option<BackendSource> {
    let before = problems.len();
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
    if vip.service_tag.is_some() && vip.service.is_none() {
        problems.push(format!("{at}.service_tag: only meaningful with `service`"));
    }
    let backends = validate_static(at, &vip.backends, problems);
    let dns = vip
        .dns
        .as_ref()
        .and_then(|d| DnsTarget::from_config(d, &format!("{at}.dns"), problems));
    let consul = vip.service.as_ref().and_then(|service| {
        if service.is_empty() || service.contains(['/', '?', ' ']) {
            problems.push(format!("{at}.service: {service:?} is not a Consul service name"));
            return None;
        }
        Some(ConsulTarget {
            service: service.clone(),
            tag: vip.service_tag.clone(),
        })
    });
    if problems.len() != before {
        return None;
    }
    match (consul, dns) {
        (Some(target), _) => Some(BackendSource::Consul(target)),
        (None, Some(target)) => Some(BackendSource::Dns(target)),
        (None, None) => Some(BackendSource::Static(backends)),
    }
}

/// `backends = [...]`: addresses, weights, no address twice.
fn validate_static(at: &str, specs: &[BackendSpec], problems: &mut Vec<String>) -> Vec<Backend> {
    let mut backends = Vec::new();
    let mut seen = HashSet::new();
    for (j, spec) in specs.iter().enumerate() {
        let (address, weight, zone, region, rack) = match spec {
            BackendSpec::Address(a) => (a, DEFAULT_WEIGHT, None, None, None),
            BackendSpec::Detailed {
                address,
                weight,
                zone,
                region,
                rack,
            } => (address, *weight, zone.clone(), region.clone(), rack.clone()),
        };
        for (field, value) in [("zone", &zone), ("region", &region), ("rack", &rack)] {
            if let Some(v) = value {
                if !valid_domain_name(v) {
                    problems.push(format!(
                        "{at}.backends[{j}].{field}: {v:?} must be 1 to {MAX_DOMAIN_NAME} characters, without spaces"
                    ));
                }
            }
        }
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
        backends.push(Backend {
            addr,
            weight,
            zone,
            region,
            rack,
        });
    }
    backends
}

/// The longest zone, region or rack name of a static backend: they become
/// metric-adjacent counts and `/status` fields, never unbounded text.
const MAX_DOMAIN_NAME: usize = 128;

/// Whether a fault-domain name (zone, region, rack) is usable.
fn valid_domain_name(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_DOMAIN_NAME && !v.contains(char::is_whitespace)
}

/// `[consul]`, checked once, and only when something uses it (a VIP with
/// `service`, or `[ha]`): one bad address is one problem.
fn validate_consul(c: &ConsulConfig, needed: bool, problems: &mut Vec<String>) -> ConsulSettings {
    let settings = ConsulSettings {
        address: c.address.clone(),
        token: c.token.clone(),
        token_file: c.token_file.clone(),
        tls: c.tls(),
        wait: c.wait.unwrap_or(DEFAULT_CONSUL_WAIT),
    };
    problems.extend(c.wait_problem());
    if needed {
        // Each problem names the key (`consul.ca_file …`) or the `CONSUL_*`
        // variable at fault.
        problems.extend(c.client_problem(|name| std::env::var(name).ok()));
    }
    settings
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::ha::{default_id, is_name};
    use crate::settings::*;

    const GOOD: &str = r#"
        [admin]
        listen = "127.0.0.1:9901"

        [[vip]]
        name = "web"
        listen = "127.0.0.1:8080"
        algorithm = "maglev"
        backends = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3, zone = "zone-b", region = "eu", rack = "r1" }]
        connect_timeout = "250ms"
        idle_timeout = "5m"
        max_connections = 100
        proxy_protocol = "v2"
    "#;

    /// The `[consul]` TLS and token-file settings reach the client's config,
    /// a missing token file or CA is a problem naming the setting, and the
    /// token never shows in `Debug`.
    #[test]
    fn consul_tls_and_token_file_settings_are_checked_at_load() {
        let dir = std::env::temp_dir().join(format!("halo-lb-consul-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, "s3cret-token\n").unwrap();
        std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let file = |consul: &str| {
            format!(
                "[admin]\nlisten = \"127.0.0.1:9901\"\n[consul]\n{consul}\n\
                 [[vip]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nservice = \"web\"\n"
            )
        };
        let v = Config::parse(
            &file(&format!(
                "address = \"unix:///run/consul/http.sock\"\ntoken = \"literal-s3cret\"\n\
                 token_file = \"{}\"\ntls_server_name = \"server.dc1.consul\"\ntls_skip_verify = false",
                token_file.display()
            )),
            "consul.toml",
        )
        .unwrap();
        assert_eq!(v.consul.token_file.as_deref(), Some(token_file.as_path()));
        assert_eq!(v.consul.tls.server_name.as_deref(), Some("server.dc1.consul"));
        assert_eq!(v.consul.tls.skip_verify, Some(false));
        assert_eq!(v.consul.client().unwrap().address(), "unix:///run/consul/http.sock");
        assert!(v.consul.token().unwrap().is_set());
        assert!(!format!("{v:?}").contains("s3cret"), "{v:?}");

        let e = Config::parse(&file("token_file = \"/nonexistent/halo-token\""), "consul.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("token_file: /nonexistent/halo-token"), "{e}");
        let e = Config::parse(
            &file("address = \"https://127.0.0.1:8501\"\nca_file = \"/nonexistent/ca.pem\""),
            "consul.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ca_file /nonexistent/ca.pem"), "{e}");
        let e = Config::parse(&file("cert_file = \"/x.pem\""), "consul.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_file (CONSUL_CLIENT_KEY) is not"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_good_file_parses_with_defaults_filled_in() {
        let v = Config::parse(GOOD, "good.toml").unwrap();
        assert_eq!(v.admin, "127.0.0.1:9901".parse().unwrap());
        let vip = &v.vips[0];
        assert_eq!(vip.settings.algorithm, Algorithm::Maglev);
        assert_eq!(vip.settings.connect_timeout, Duration::from_millis(250));
        assert_eq!(vip.settings.idle_timeout, Duration::from_secs(300));
        assert_eq!(vip.settings.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(vip.settings.retries, DEFAULT_RETRIES);
        assert_eq!(vip.settings.copy, CopyMode::Splice);
        let BackendSource::Static(backends) = &vip.source else {
            panic!("static backends")
        };
        assert_eq!(
            backends[1],
            Backend {
                addr: "127.0.0.1:9002".parse().unwrap(),
                weight: 3,
                zone: Some("zone-b".into()),
                region: Some("eu".into()),
                rack: Some("r1".into()),
            }
        );
        assert_eq!(backends[0].weight, 1);
    }

    fn err(text: &str) -> String {
        Config::parse(text, "bad.toml").unwrap_err().to_string()
    }

    #[test]
    fn udp_vips_validate_their_own_fields() {
        let vip = |name: &str, extra: &str| {
            format!("[[vip]]\nname = \"{name}\"\nlisten = \"127.0.0.1:5353\"\nbackends = [\"127.0.0.1:53\"]\n{extra}\n")
        };
        // A TCP and a UDP VIP share a port; the defaults of a UDP VIP.
        let v = Config::parse(
            &format!("{}{}", vip("dns-tcp", ""), vip("dns", "protocol = \"udp\"")),
            "ok",
        )
        .unwrap();
        assert_eq!(v.vips[0].protocol, Protocol::Tcp);
        assert_eq!(v.vips[1].protocol, Protocol::Udp);
        assert_eq!(v.vips[1].settings.udp, UdpSettings::default());
        assert_eq!(v.vips[1].settings.udp.idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
        let v = Config::parse(
            &vip(
                "dns",
                "protocol = \"udp\"\nudp_idle_timeout = \"5s\"\nudp_responses = 1\nproxy_protocol = \"v2\"",
            ),
            "ok",
        )
        .unwrap();
        assert_eq!(
            v.vips[0].settings.udp,
            UdpSettings {
                idle_timeout: Duration::from_secs(5),
                responses: Some(1)
            }
        );
        // Two UDP VIPs on one port conflict, as two TCP ones do.
        let e = err(&format!(
            "{}{}",
            vip("a", "protocol = \"udp\""),
            vip("b", "protocol = \"udp\"")
        ));
        assert!(
            e.contains("vip[1].listen: 127.0.0.1:5353 is used by another udp vip"),
            "{e}"
        );
        // UDP fields on a TCP VIP, zero values, PROXY v1, a bad protocol.
        let e = err(&vip("a", "udp_idle_timeout = \"5s\"\nudp_responses = 2"));
        assert!(
            e.contains("vip[0].udp_idle_timeout: only for protocol = \"udp\""),
            "{e}"
        );
        assert!(e.contains("vip[0].udp_responses: only for protocol = \"udp\""), "{e}");
        let e = err(&vip(
            "a",
            "protocol = \"udp\"\nudp_idle_timeout = \"0s\"\nudp_responses = 0\nproxy_protocol = \"v1\"",
        ));
        assert!(e.contains("vip[0].udp_idle_timeout: must be above zero"), "{e}");
        assert!(e.contains("vip[0].udp_responses: must be at least 1"), "{e}");
        assert!(e.contains("vip[0].proxy_protocol: \"v1\" has no form for UDP"), "{e}");
        let e = err(&vip("a", "protocol = \"sctp\""));
        assert!(e.contains("protocol") && e.contains("sctp"), "{e}");
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
            backends = ["127.0.0.1:9001", "not-an-address", { address = "127.0.0.1:9003", weight = 0 }, { address = "127.0.0.1:9004", region = "", rack = "rack 1" }]
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
            "vip[0].backends[3].region: \"\" must be",
            "vip[0].backends[3].rack: \"rack 1\" must be",
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

    /// `mode = "ecmp"`: its defaults, its fields refused on a pair, the
    /// pair's floating and probe addresses refused on it, and VIPs that
    /// cannot be announced.
    #[test]
    fn ecmp_mode_is_checked() {
        let vip = "[[vip]]\nname = \"web\"\nlisten = \"198.19.0.200:80\"\nbackends = [\"127.0.0.1:9001\"]\n";
        let base = format!("[admin]\nlisten = \"127.0.0.1:9901\"\n[consul]\naddress = \"127.0.0.1:8500\"\n{vip}");
        let v = Config::parse(&format!("{base}[ha]\nmode = \"ecmp\"\nid = \"lb1\"\n"), "ok.toml").unwrap();
        let ecmp = v.ha.unwrap().ecmp.unwrap();
        assert_eq!(ecmp.interface, "halo-vips");
        assert_eq!(ecmp.lease, Duration::from_secs(3));
        assert_eq!(ecmp.confirm_every, Duration::from_millis(600));
        assert_eq!(ecmp.withdraw_wait, Duration::from_secs(1));
        assert_eq!((ecmp.max_announcing, ecmp.expect_announcing), (None, None));
        let v = Config::parse(
            &format!("{base}[ha]\nmode = \"ecmp\"\nid = \"lb1\"\nmax_announcing = 2\n"),
            "ok.toml",
        )
        .unwrap();
        assert_eq!(
            v.ha.unwrap().ecmp.unwrap().expect_announcing,
            Some(2),
            "expect follows the cap"
        );
        let v = Config::parse(&format!("{base}[ha]\nid = \"lb1\"\n"), "ok.toml").unwrap();
        assert!(v.ha.unwrap().ecmp.is_none(), "a pair by default");

        let e = err(&format!(
            "{base}[ha]\nid = \"lb1\"\nannounce_lease = \"3s\"\nmax_announcing = 2\n"
        ));
        for needle in [
            "ha.announce_lease: only for mode = \"ecmp\"",
            "ha.max_announcing: only for mode = \"ecmp\"",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
        let e = err(&format!(
            "{base}[ha]\nmode = \"ecmp\"\nvip_address = \"198.18.0.100/24\"\nvip_interface = \"eth0\"\nprobe_listen = \"127.0.0.1:9\"\n\
             announce_interface = \"a/b\"\nannounce_lease = \"100ms\"\nwithdraw_wait = \"1m\"\nmax_announcing = 2\nexpect_announcing = 3\n"
        ));
        for needle in [
            "ha.vip_address: only for a pair",
            "ha.vip_interface: only for a pair",
            "ha.probe_listen: only for a pair",
            "ha.announce_interface: \"a/b\"",
            "ha.announce_lease: 100ms",
            "ha.withdraw_wait: 60s is over 30s",
            "ha.expect_announcing: 3 is more than max_announcing (2)",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
        let e = err(&format!(
            "{base}[ha]\nmode = \"ecmp\"\nmax_announcing = 0\n[[vip]]\nname = \"any\"\nlisten = \"0.0.0.0:81\"\nbackends = [\"127.0.0.1:9001\"]\n"
        ));
        assert!(e.contains("ha.max_announcing: 0"), "{e}");
        assert!(e.contains("vip[1].listen: 0.0.0.0:81 cannot be announced"), "{e}");
        let e = err(&format!("{base}[ha]\nmode = \"anycast\"\n"));
        assert!(e.contains("anycast"), "{e}");
    }
}

/// The loader against random and mangled files: it never panics, and every
/// error names a field (`vip[0].listen: …`) or a line (TOML syntax and type
/// errors).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    const EXAMPLES: [&str; 7] = [
        include_str!("../../../packaging/examples/lb.toml"),
        include_str!("../../../packaging/examples/lb-consul.toml"),
        include_str!("../../../packaging/examples/lb-dns.toml"),
        include_str!("../../../packaging/examples/lb-udp.toml"),
        include_str!("../../../packaging/examples/lb-ha-1.toml"),
        include_str!("../../../packaging/examples/lb-ha-2.toml"),
        include_str!("../../../packaging/examples/lb-ecmp.toml"),
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
