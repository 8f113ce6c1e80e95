//! `halo-consul`: a small async client for the parts of Consul's HTTP API that
//! halo relies on.
//!
//! It covers the local agent's service and TTL-check API (how sidecars
//! register workloads and push their health), the health view with blocking
//! queries (how balancers learn their backends), and sessions and KV locks
//! (how the balancer pair elects its active instance).
//!
//! We write our own rather than use an existing crate because the ones that
//! exist either block a thread per call (the `consul` crate, on `reqwest`'s
//! blocking client) or lack the agent API and session renewal (`rs-consul`).
//! This one is built on hyper 1 and hyper-util: every call is async, has a
//! deadline, and can be cancelled by dropping it; nothing blocks, not even in
//! `Drop`.
//!
//! The rules this client encodes (durations as strings, the blocking-query
//! index rules, what an explicit empty check list means for a session, which
//! answers mean "not found" on Consul 1.8 and on current Consul) are those of
//! the project's `CONSUL.md`; it is tested against a real Consul 1.8.7 agent.
//!
//! # Layout
//! - [`client`](Client): configuration, the connection pool, and the one place
//!   requests are sent, with timeouts and error mapping.
//! - `agent`: service registration, maintenance, TTL check updates.
//! - `health`: `/v1/health/service/:name`.
//! - `session`: create, renew (once or periodically), destroy, info.
//! - `kv`: get, put, cas, acquire, release, delete.
//! - `query`: consistency modes, response metadata, and [`Watch`], the
//!   blocking-query loop every watcher uses.
//! - [`duration`]: Go duration strings, shared with halo's config files.
//! - `error`: the [`Error`] enum.

mod agent;
mod client;
pub mod duration;
mod error;
mod health;
mod kv;
mod query;
mod session;

pub use agent::{AgentCheck, AgentService, CheckKind, CheckRegistration, CheckStatus, ServiceRegistration, Weights};
pub use client::{Client, Config, DEFAULT_ADDRESS, DEFAULT_TIMEOUT, DEFAULT_WAIT};
pub use error::Error;
pub use health::{CatalogService, HealthCheck, HealthQuery, Node, ServiceEntry};
pub use kv::KvPair;
pub use query::{
    Consistency, QueryMeta, QueryOptions, Response, Watch, DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN,
    DEFAULT_WATCH_BURST, DEFAULT_WATCH_RATE,
};
pub use session::{ServiceCheckRef, SessionBehavior, SessionChecks, SessionInfo, SessionRequest};

/// Deserializes JSON `null` as the type's default: Consul sends `null` for
/// empty lists and maps.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + serde::Deserialize<'de>,
{
    use serde::Deserialize;
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
