//! `dns = { ... }` validated: the name, the server and the timing of a
//! VIP's DNS SRV discovery. Looking it up is `sources::dns`.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_net::proto::rr::Name;

use super::file::DnsConfig;

/// A validated `dns = { ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    /// The name looked up, fully qualified (with the final dot).
    pub name: String,
    /// The DNS server.
    pub server: SocketAddr,
    /// Time between lookups.
    pub interval: Duration,
    /// Deadline of one refresh.
    pub timeout: Duration,
}

impl DnsTarget {
    /// Validates `c`, pushing each problem (named under `at`) to `problems`.
    pub fn from_config(c: &DnsConfig, at: &str, problems: &mut Vec<String>) -> Option<DnsTarget> {
        let before = problems.len();
        let name = if c.name.ends_with('.') {
            c.name.clone()
        } else {
            format!("{}.", c.name)
        };
        let labels_ok = name.len() <= 254
            && name.trim_end_matches('.').split('.').all(|l| {
                (1..=63).contains(&l.len()) && l.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            });
        if !labels_ok || Name::from_ascii(&name).is_err() {
            problems.push(format!(
                "{at}.name: {:?} is not a DNS name like \"web.service.consul\"",
                c.name
            ));
        }
        let server = c.server.parse::<SocketAddr>();
        if server.is_err() {
            problems.push(format!("{at}.server: {:?} is not an ip:port address", c.server));
        }
        // The same floors as health checks: a refresh is a TCP connect and
        // one or more queries; "1ns" would be a load test of the DNS server.
        if c.interval < halo_health::checker::MIN_INTERVAL {
            problems.push(format!(
                "{at}.interval: {} is below the floor of {}",
                halo_consul::duration::format(c.interval),
                halo_consul::duration::format(halo_health::checker::MIN_INTERVAL)
            ));
        }
        if c.timeout < halo_health::checker::MIN_TIMEOUT {
            problems.push(format!(
                "{at}.timeout: {} is below the floor of {}",
                halo_consul::duration::format(c.timeout),
                halo_consul::duration::format(halo_health::checker::MIN_TIMEOUT)
            ));
        }
        (problems.len() == before).then(|| DnsTarget {
            name,
            server: server.expect("checked above"),
            interval: c.interval,
            timeout: c.timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Option<DnsTarget>, Vec<String>) {
        let c: DnsConfig = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        (DnsTarget::from_config(&c, "vip[0].dns", &mut problems), problems)
    }

    #[test]
    fn a_good_target_is_fully_qualified_with_defaults() {
        let (t, p) = parse("name = \"web.service.consul\"");
        assert!(p.is_empty(), "{p:?}");
        let t = t.unwrap();
        assert_eq!(t.name, "web.service.consul.");
        assert_eq!(t.server, "127.0.0.1:8600".parse().unwrap());
        assert_eq!(t.interval, Duration::from_secs(5));
        let (t, _) = parse("name = \"_web._tcp.service.consul.\"\nserver = \"10.0.0.1:53\"\ninterval = \"1s\"");
        assert_eq!(t.unwrap().name, "_web._tcp.service.consul.");
    }

    #[test]
    fn every_bad_field_is_named() {
        let (t, p) = parse("name = \"web service\"\nserver = \"localhost\"\ninterval = \"0s\"\ntimeout = \"0s\"");
        assert!(t.is_none());
        for needle in [
            "vip[0].dns.name",
            "vip[0].dns.server",
            "vip[0].dns.interval",
            "vip[0].dns.timeout",
        ] {
            assert!(p.iter().any(|x| x.starts_with(needle)), "missing {needle}: {p:?}");
        }
        let (_, p) = parse("name = \"web.service.consul\"\nserver = \"127.0.0.1:8600\"\ninterval = \"1ns\"");
        assert!(
            p.iter()
                .any(|x| x.contains("interval: 1ns is below the floor of 100ms")),
            "{p:?}"
        );
        assert!(!parse("name = \"a..b\"").1.is_empty());
        assert!(!parse("name = \"\"").1.is_empty());
    }
}
