//! `halo-health`: health checks and health endpoints, shared by halo's
//! sidecar (which probes the app it runs beside) and balancer (which probes
//! its backends).
//!
//! A [`Probe`] is one attempt (HTTP, TCP connect, or a command run without a
//! shell); a checker runs a probe on an interval with jitter and applies
//! rise/fall hysteresis, publishing only flips on a `watch` channel; the
//! server module answers `/health/live` and `/health/ready` and runs the small
//! HTTP/1 loop both binaries' admin APIs are built on.
//!
//! # Layout
//! - [`probe`]: HTTP, TCP and exec probes with deadlines and capped output.
//! - [`checker`]: the interval loop, [`Hysteresis`], [`CheckHandle`].
//! - [`server`]: health endpoints, JSON/text responses, the serve loop.
//! - [`telemetry`]: logging and the Prometheus recorder for both binaries.

pub mod checker;
pub mod probe;
pub mod server;
pub mod telemetry;

pub use checker::{spawn, CheckConfig, CheckHandle, CheckState, Hysteresis, Status};
pub use probe::{ExecProbe, HttpProbe, Outcome, Probe, ProbeResult, Prober};
