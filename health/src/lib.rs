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

pub mod checker;
pub mod probe;
pub mod server;
pub mod telemetry;

pub use checker::{spawn, CheckConfig, CheckHandle, CheckState, Hysteresis, Status};
pub use probe::{ExecProbe, HttpProbe, Outcome, Probe, ProbeResult, Prober};
