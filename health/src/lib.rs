//! `halo-health`: health checks and health endpoints, shared by halo's
//! sidecar (which probes the app it runs beside) and balancer (which probes
//! its backends).
//!
//! A [`Probe`] is one attempt (HTTP, TCP connect, or a command run without a
//! shell, in a process group of its own that is killed when the probe ends),
//! bounded by a deadline and reading at most a few KiB of output; a checker
//! runs a probe on an interval (no shorter than
//! [`checker::MIN_INTERVAL`]) with jitter and applies rise/fall hysteresis,
//! publishing only flips on a `watch` channel; the server module answers
//! `/health/live` and `/health/ready` and runs the small HTTP/1 loop both
//! binaries' admin APIs are built on, within [`server::ServerLimits`]
//! (header deadline, idle timeout, connection lifetime and cap).
//!
//! # Layout
//! - [`probe`]: HTTP, TCP and exec probes with deadlines and capped output.
//! - [`checker`]: the interval loop, [`Hysteresis`], [`CheckHandle`], the
//!   timing validation (and its floors) every config shares.
//! - [`server`]: health endpoints, JSON/text responses, the serve loop and
//!   its [`server::ServerLimits`].
//! - [`telemetry`]: logging (coloured only on a terminal) and the Prometheus
//!   recorder for both binaries.
//! - [`auth`]: who may use the admin APIs' write endpoints (bearer token,
//!   loopback, `Host`/`Origin` checks against browsers), and token files.
//! - [`service`]: life under a service manager: systemd's readiness
//!   protocol and watchdog, and the `healthcheck` subcommand's request.
//! - [`man`]: the man pages both binaries write from their CLI definitions.
//! - [`host_name`]: the host name both binaries derive default ids from.

pub mod auth;
pub mod checker;
pub mod man;
pub mod probe;
pub mod server;
pub mod service;
pub mod telemetry;

pub use checker::{spawn, spawn_unrecorded, CheckConfig, CheckHandle, CheckState, Hysteresis, Status};
pub use probe::{ExecProbe, HttpProbe, Outcome, Probe, ProbeResult, Prober};

/// This host's name as both binaries put it into the ids they derive from
/// it (the sidecar's service ID, the balancer's `ha.id`): letters, digits,
/// '-', '_' and '.' are kept and any other character becomes '-', so a
/// host name never makes an id Consul or a config check refuses. An
/// unreadable name is "localhost".
pub fn host_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    sanitize_host(&host)
}

fn sanitize_host(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_names_keep_only_id_characters() {
        assert_eq!(super::sanitize_host("web-1.example_x"), "web-1.example_x");
        assert_eq!(super::sanitize_host("wéb 1:2"), "w-b-1-2");
        assert!(!super::host_name().is_empty());
    }
}
