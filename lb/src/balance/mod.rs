//! The balancing core: what a VIP balances over and how it picks.
//!
//! - [`backend`]: a backend's identity ([`backend::Backend`]) and its live
//!   state (connection counts, passive ejection with exponential back-off,
//!   the active check's verdict), and a table's [`backend::Entry`].
//! - [`selection`]: each algorithm's precomputed state and the pick.
//! - [`hash`]: stable hashes of backend and client addresses.
//! - [`maglev`]: Maglev's lookup table, built in full once, then updated
//!   by moving only the slots a change must move.
//! - [`zone`]: zone-aware routing: local backends first while enough of
//!   them are healthy.
//! - [`spread`]: the fault-domain spread of a table's healthy backends
//!   (distinct zones, regions, racks).
//! - [`table`]: the immutable table, the per-VIP publisher that rebuilds and
//!   swaps it, and the VIP's metrics.
//!
//! Tables are built wherever a source or the admin API changes an input
//! (the control runtime); the workers read the published table without a
//! lock. Imports: `settings` only.

pub(crate) mod backend;
pub(crate) mod hash;
pub(crate) mod maglev;
pub(crate) mod selection;
pub(crate) mod spread;
pub(crate) mod table;
pub(crate) mod zone;
