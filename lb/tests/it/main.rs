//! halo-lb end to end: the real binary, real sockets, backends the tests run.

mod support;

mod active_check;
mod admin;
mod admin_auth;
mod config;
mod data_plane;
mod discovery;
mod dns;
mod ecmp;
mod exhaustion;
mod floating;
mod floating_ha;
mod ha;
mod ha_reload;
mod layout;
mod lifecycle;
mod production;
mod production_consul;
mod spread;
mod token_files;
mod udp;
mod zone;
