//! `[vip.check]` validated: what the balancer's own active check of each
//! backend is, and the halo-health probe and checker settings it becomes.
//! Running the checks is `sources::checks`.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use halo_health::probe::parse_status_range;
use halo_health::{CheckConfig, HttpProbe, Probe};

use super::file::{ActiveCheckConfig, ActiveCheckType};

/// A validated `[vip.check]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// TCP connect or HTTP GET.
    pub kind: ActiveCheckType,
    /// HTTP: the path requested.
    pub path: String,
    /// HTTP: the statuses that pass.
    pub expect_status: RangeInclusive<u16>,
    /// The port checked; `None`: the backend's own.
    pub port: Option<u16>,
    /// Time between checks.
    pub interval: Duration,
    /// Deadline of one check.
    pub timeout: Duration,
    /// Passes in a row to come back.
    pub rise: u32,
    /// Failures in a row to go out.
    pub fall: u32,
}

impl CheckSpec {
    /// Validates `c`, pushing each problem (named under `at`) to `problems`.
    pub fn from_config(c: &ActiveCheckConfig, at: &str, problems: &mut Vec<String>) -> Option<CheckSpec> {
        let before = problems.len();
        halo_health::checker::validate_timing(at, c.interval, c.timeout, c.rise, c.fall, problems);
        if c.port == Some(0) {
            problems.push(format!("{at}.port: 0 is not a port"));
        }
        if c.kind == ActiveCheckType::Tcp {
            for (field, set) in [("path", c.path.is_some()), ("expect_status", c.expect_status.is_some())] {
                if set {
                    problems.push(format!("{at}.{field}: only meaningful with type = \"http\""));
                }
            }
        }
        let path = c.path.clone().unwrap_or_else(|| "/".to_owned());
        if !path.starts_with('/') || format!("http://127.0.0.1:1{path}").parse::<http::Uri>().is_err() {
            problems.push(format!(
                "{at}.path: {path:?} must be an absolute path like \"/healthz\""
            ));
        }
        let expect = c.expect_status.as_deref().unwrap_or("200-399");
        let expect_status = parse_status_range(expect);
        if expect_status.is_none() {
            problems.push(format!(
                "{at}.expect_status: {expect:?} is not a status or range like \"200-399\""
            ));
        }
        (problems.len() == before).then(|| CheckSpec {
            kind: c.kind,
            path,
            expect_status: expect_status.expect("checked above"),
            port: c.port,
            interval: c.interval,
            timeout: c.timeout,
            rise: c.rise,
            fall: c.fall,
        })
    }

    /// The probe of backend `addr`.
    pub fn probe(&self, addr: SocketAddr) -> Probe {
        let target = SocketAddr::new(addr.ip(), self.port.unwrap_or(addr.port()));
        match self.kind {
            ActiveCheckType::Tcp => Probe::Tcp(target),
            ActiveCheckType::Http => Probe::Http(HttpProbe {
                url: format!("http://{target}{}", self.path)
                    .parse()
                    .expect("the path was validated with an address"),
                method: http::Method::GET,
                headers: Vec::new(),
                expect_status: self.expect_status.clone(),
                expect_body: None,
            }),
        }
    }

    /// The halo-health checker settings for backend `addr` of VIP `vip`.
    pub fn check_config(&self, vip: &str, addr: SocketAddr) -> CheckConfig {
        CheckConfig {
            name: format!("{vip}/{addr}"),
            probe: self.probe(addr),
            interval: self.interval,
            timeout: self.timeout,
            // Spread the checks of many backends, as the sidecar does.
            jitter: self.interval / 10,
            rise: self.rise,
            fall: self.fall,
            starts_up: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ActiveCheckConfig {
        toml::from_str(text).unwrap()
    }

    fn problems(text: &str) -> Vec<String> {
        let mut problems = Vec::new();
        assert!(CheckSpec::from_config(&config(text), "vip[0].check", &mut problems).is_none());
        problems
    }

    #[test]
    fn defaults_and_probes() {
        let mut p = Vec::new();
        let spec = CheckSpec::from_config(&config("type = \"http\"\npath = \"/healthz\""), "c", &mut p).unwrap();
        assert_eq!(spec.expect_status, 200..=399);
        assert_eq!((spec.rise, spec.fall), (2, 3));
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let Probe::Http(http) = spec.probe(addr) else {
            panic!("an HTTP probe")
        };
        assert_eq!(http.url.to_string(), "http://127.0.0.1:8080/healthz");
        let c = spec.check_config("web", addr);
        assert_eq!(c.name, "web/127.0.0.1:8080");
        assert!(c.starts_up, "a backend its source vouches for starts up");

        let spec = CheckSpec::from_config(&config("type = \"tcp\"\nport = 9000"), "c", &mut p).unwrap();
        assert!(matches!(spec.probe(addr), Probe::Tcp(a) if a == "127.0.0.1:9000".parse().unwrap()));
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let spec = CheckSpec::from_config(&config("type = \"http\""), "c", &mut p).unwrap();
        let Probe::Http(http) = spec.probe(v6) else {
            panic!("an HTTP probe")
        };
        assert_eq!(http.url.to_string(), "http://[::1]:80/");
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn every_bad_field_is_named() {
        let p = problems(
            "type = \"tcp\"\ninterval = \"0s\"\nrise = 0\nfall = 0\nport = 0\npath = \"/x\"\nexpect_status = \"200\"",
        );
        for needle in [
            "vip[0].check.interval",
            "vip[0].check.rise",
            "vip[0].check.fall",
            "vip[0].check.port",
            "vip[0].check.path: only meaningful",
            "vip[0].check.expect_status: only meaningful",
        ] {
            assert!(p.iter().any(|x| x.starts_with(needle)), "missing {needle}: {p:?}");
        }
        let p = problems("type = \"http\"\npath = \"healthz\"\nexpect_status = \"fine\"");
        assert!(p.iter().any(|x| x.starts_with("vip[0].check.path")), "{p:?}");
        assert!(p.iter().any(|x| x.starts_with("vip[0].check.expect_status")), "{p:?}");
    }
}
