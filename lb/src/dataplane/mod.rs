//! The data plane: from an accepted client to a copied connection.
//!
//! - [`proxy`]: listeners, the accept loop, connect-with-retry.
//! - [`copy`]: buffered and splice(2) copying, half-close, idle timeout.
//! - [`proxy_protocol`]: PROXY v1/v2 headers.
//! - [`pressure`]: the process's own resources running out (descriptors,
//!   ports): pause accepting, never blame a backend.
//! - [`lease`]: the HA lease as the accept loop checks it, per connection.
//! - [`workers`]: the worker threads, epoll or io_uring.
//! - [`uring`]: the io_uring data plane (accept, connect, copy on one ring
//!   per worker).
//! - [`udp`]: UDP VIPs: flows, batched datagrams, per-worker sockets.
//! - [`slab`]: stable-index storage for the workers' connections and flows;
//!   [`mailbox`]: how the control plane hands a worker a command.
//!
//! Everything here runs on the worker threads (`halo-worker-N`), each
//! serving the connections it accepted to the end. Imports: `settings`,
//! `balance`.

pub(crate) mod copy;
pub(crate) mod lease;
pub(crate) mod mailbox;
pub(crate) mod pressure;
pub(crate) mod proxy;
pub(crate) mod proxy_protocol;
pub(crate) mod slab;
pub(crate) mod udp;
pub(crate) mod uring;
pub(crate) mod workers;
