//! `halo-lb`: halo's layer-4 (TCP) load balancer for virtual IPs.
//!
//! Each VIP has an accept loop and one immutable backend table published
//! through an `ArcSwap`. A connection loads the current table once, picks a
//! backend with the VIP's algorithm (round robin, least connections, power of
//! two choices, or Maglev), retries other backends if the connect fails, and
//! copies bytes both ways with half-close and an idle timeout. Tables are
//! rebuilt off the data path (config reload, admin API, discovery) and
//! swapped only when their inputs changed.
//!
//! With `[ha]`, two instances form an active/standby pair: both run
//! discovery and keep warm tables, and only the holder of a Consul lock
//! binds the listeners (`control::ha`).
//!
//! # Layout: five planes, imports one way
//!
//! Each folder is a plane; a plane imports only the planes listed before it,
//! so each can be read (and changed) without the ones after it.
//!
//! | folder | what lives there | runs on |
//! |---|---|---|
//! | `settings` | the TOML file and the validated settings: plain data, no imports from the rest of the crate | whoever loads the file |
//! | `balance` | backends and their live state, selection (the algorithms), zone-aware routing, the published table of each VIP | built on the control thread, read lock-free by the workers |
//! | `sources` | where backends come from (static lists, Consul, DNS SRV) behind one `Source` trait and one fail-static loop, and the balancer's own active checks | tasks on the control runtime |
//! | `dataplane` | listeners, the accept loop, connect-with-retry, copying, PROXY headers, the process's resource pressure, the lease check, the worker threads | one worker thread per core (`halo-worker-N`), each an io_uring completion loop (`uring`) or a single-threaded epoll runtime (`proxy`, `copy`) |
//! | `control` | the running server (VIPs, reload, drain), `/status`, the admin API, the HA election and the floating address | the main runtime; the election on its own `halo-ha` thread |
//!
//! Data flows one way: a source → the VIP's table builder
//! ([`Vip::set_backends`]) → a published snapshot ([`Table`]) → the
//! accept loops on the workers.
//!
//! # The crate's surface
//!
//! Everything is crate-private except what the `halo-lb` binary, the
//! integration tests and the benchmarks use, re-exported here.

#![warn(unreachable_pub)]

mod balance;
mod control;
mod dataplane;
pub mod settings;
mod sources;

pub use balance::table::{Table, Vip};
pub use control::floating::{Error as FloatingError, FloatingIp, Outcome as FloatingOutcome};
pub use control::status;
pub use control::{describe_probe_address, run};
pub use dataplane::proxy::bind;
pub use settings::{Config, ConfigError, Validated};
