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
//! answers mean "not found" on Consul 1.8 and on current Consul) are written
//! down in the repository's `docs/consul.md`; it is tested against a real
//! Consul 1.8.7 agent.
//!
//! Answers are untrusted bytes. Every body is read piece by piece up to
//! [`Config::max_response_bytes`] (default [`DEFAULT_MAX_RESPONSE_BYTES`]),
//! error bodies only up to a few KiB, and any text copied from an answer into
//! an [`Error`] is cut to [`MAX_ERROR_TEXT_BYTES`]. A list is only ever a JSON
//! array: `null` or malformed JSON is an error, never an empty list, because
//! callers build tables from these lists. An empty list may still be Consul
//! filtering by ACL: [`Client::acl_token_self`] tells at start whether that
//! is possible (see the `acl` module's notes on Consul 1.8).
//!
//! The agent is reached over plain HTTP, HTTPS (rustls on the `ring`
//! provider: CA file or directory, client certificate, server name, an
//! explicit and loudly logged opt-out of verification) or its unix socket,
//! configured as Consul's own tools are ([`Config`], [`TlsConfig`], and
//! Consul's `CONSUL_*` environment variables). The ACL token may come from a
//! file that [`Client::reload_token`] reads again; it never appears in a
//! log line, an error or `Debug` output.
//!
//! # Layout
//! - [`client`](Client): configuration, the token, the connection pool, and
//!   the one place requests are sent, with timeouts, body limits and error
//!   mapping.
//! - `tls`: [`TlsConfig`], its environment variables, and the rustls
//!   configuration built from it; TLS errors explained.
//! - `token`: the ACL [`Token`], its sources, and the shared cell SIGHUP
//!   reloads.
//! - [`file`](mod@file): opening token and PEM files without blocking (a FIFO is
//!   refused, not waited on), regular files only, reads bounded; the
//!   owner-only rule for secrets.
//! - `connect`: the connector: TCP (plain or TLS) or a unix socket.
//! - `acl`: the token self-check ([`TokenStatus`]) and what Consul 1.8 does
//!   with reads a token may not make.
//! - `agent`: service registration, maintenance, TTL check updates.
//! - `health`: `/v1/health/service/:name`.
//! - `session`: create, renew (once or periodically), destroy, info.
//! - `kv`: get, put, cas, acquire, release, delete.
//! - `query`: consistency modes, response metadata, and [`Watch`], the
//!   blocking-query loop every watcher uses.
//! - [`duration`]: Go duration strings, shared with halo's config files.
//! - `section`: [`Section`], the `[consul]` table of both programs' config
//!   files, with its own deserializer and the problems a config check reports.
//! - `error`: the [`Error`] enum.
//! - `fuzz` (tests only): property tests of the JSON decoders.

mod acl;
mod agent;
mod client;
mod connect;
pub mod duration;
mod error;
pub mod file;
mod health;
mod kv;
mod query;
mod section;
mod session;
mod tls;
mod token;

#[cfg(test)]
mod fuzz;

pub use acl::{TokenInfo, TokenStatus};
pub use agent::{
    AgentCheck, AgentSelf, AgentService, CheckKind, CheckRegistration, CheckStatus, ServiceRegistration, Weights,
};
pub use client::{
    redact_address, Client, Config, DEFAULT_ADDRESS, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT, DEFAULT_WAIT,
    MAX_ERROR_TEXT_BYTES,
};
pub use error::Error;
pub use health::{CatalogService, HealthCheck, HealthQuery, Node, ServiceEntry};
pub use kv::KvPair;
pub use query::{
    AclPolicy, Consistency, QueryMeta, QueryOptions, Response, Watch, DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN,
    DEFAULT_WATCH_BURST, DEFAULT_WATCH_RATE,
};
pub use section::Section;
pub use session::{ServiceCheckRef, SessionBehavior, SessionChecks, SessionInfo, SessionRequest};
pub use tls::TlsConfig;
pub use token::{Token, MAX_TOKEN_FILE_BYTES};

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
