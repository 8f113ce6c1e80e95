//! The per-backend and fault-domain series of `/metrics`, rendered from the
//! published tables at scrape time.
//!
//! The metrics registry keeps every series it ever saw: a backend that left
//! a table would stay in `/metrics` for the life of the process, and a VIP
//! whose Consul service churns would grow it without bound. So the series
//! labelled by backend, and those derived from live health (the spread,
//! the state counts), are not in the registry: they are written here, from
//! each VIP's current table, and vanish with the backend. Counters restart
//! from zero when an address comes back (a new live state), which
//! Prometheus reads as a counter reset.

use std::sync::Arc;

use crate::balance::spread;
use crate::balance::table::Vip;
use crate::dataplane::udp;

/// One family: its name, type, help, and samples as (labels, value).
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, u64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }
}

/// A label value escaped for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The Prometheus text of every VIP's backend and spread series.
pub(crate) fn render(vips: &[(Arc<Vip>, Option<Arc<udp::Stats>>)]) -> String {
    let now = Vip::now();
    let mut connections = Family::new(
        "halo_backend_connections_total",
        "counter",
        "Proxied connections started to a backend.",
    );
    let mut active = Family::new(
        "halo_backend_active_connections",
        "gauge",
        "Live proxied connections to a backend.",
    );
    let mut up = Family::new(
        "halo_backend_up",
        "gauge",
        "1 if a backend can be picked now (not disabled, not ejected, its active check not failing), else 0.",
    );
    let mut failures = Family::new(
        "halo_backend_connect_failures_total",
        "counter",
        "Failed connects to a backend.",
    );
    let mut ejections = Family::new(
        "halo_backend_ejections_total",
        "counter",
        "Passive ejections of a backend.",
    );
    let mut check_up = Family::new(
        "halo_backend_check_up",
        "gauge",
        "1 if a backend's active check passes, 0 if it fails; absent without [vip.check].",
    );
    let mut check_flips = Family::new(
        "halo_backend_check_flips_total",
        "counter",
        "Flips of a backend's active check.",
    );
    let mut states = Family::new(
        "halo_vip_backends",
        "gauge",
        "Backends of a VIP's table by state (healthy, ejected, check_failing, disabled).",
    );
    let mut healthy = Family::new(
        "halo_vip_healthy_backends",
        "gauge",
        "Backends of a VIP that can be picked now.",
    );
    let mut zones = Family::new(
        "halo_vip_healthy_zones",
        "gauge",
        "Distinct zones among a VIP's healthy backends.",
    );
    let mut regions = Family::new(
        "halo_vip_healthy_regions",
        "gauge",
        "Distinct regions among a VIP's healthy backends.",
    );
    let mut racks = Family::new(
        "halo_vip_healthy_racks",
        "gauge",
        "Distinct racks among a VIP's healthy backends.",
    );
    let mut listed_zones = Family::new(
        "halo_vip_zones",
        "gauge",
        "Distinct zones among all the backends of a VIP's table, whatever their health.",
    );
    let mut flows_active = Family::new("halo_vip_udp_flows", "gauge", "Live UDP flows of a VIP.");
    let mut flows_created = Family::new("halo_vip_udp_flows_created_total", "counter", "UDP flows opened.");
    let mut flows_ended = Family::new(
        "halo_vip_udp_flows_ended_total",
        "counter",
        "UDP flows ended, by how: expired (idle), answered (udp_responses reached), evicted (flow limit), failed (ICMP error from the backend), closed (VIP no longer served).",
    );
    let mut datagrams = Family::new(
        "halo_vip_udp_datagrams_total",
        "counter",
        "UDP datagrams forwarded: in (client to backend), out (backend to client).",
    );
    let mut drops = Family::new(
        "halo_vip_udp_drops_total",
        "counter",
        "UDP datagrams dropped, by reason.",
    );
    let mut backend_datagrams = Family::new(
        "halo_backend_udp_datagrams_total",
        "counter",
        "UDP datagrams to a backend (in) and from it (out).",
    );
    let mut backend_bytes = Family::new(
        "halo_backend_udp_bytes_total",
        "counter",
        "UDP payload bytes to a backend (in) and from it (out).",
    );
    for (vip, udp) in vips {
        let table = vip.table();
        let v = escape(vip.name());
        let vl = format!("vip=\"{v}\"");
        for e in &table.entries {
            let l = format!("vip=\"{v}\",backend=\"{}\"", e.backend.addr);
            let c = e.state.counters();
            connections.samples.push((l.clone(), c.connections));
            active.samples.push((l.clone(), e.state.active() as u64));
            up.samples.push((l.clone(), u64::from(spread::healthy(e, now))));
            failures.samples.push((l.clone(), c.connect_failures));
            ejections.samples.push((l.clone(), c.ejections));
            if udp.is_some() {
                backend_datagrams
                    .samples
                    .push((format!("{l},direction=\"in\""), c.datagrams_in));
                backend_datagrams
                    .samples
                    .push((format!("{l},direction=\"out\""), c.datagrams_out));
                backend_bytes
                    .samples
                    .push((format!("{l},direction=\"in\""), c.bytes_in));
                backend_bytes
                    .samples
                    .push((format!("{l},direction=\"out\""), c.bytes_out));
            }
            if e.state.check().is_some() {
                check_up.samples.push((l.clone(), u64::from(!e.state.check_failing())));
                check_flips.samples.push((l, c.check_flips));
            }
        }
        if let Some(udp) = udp {
            let s = udp.snapshot();
            flows_active.samples.push((vl.clone(), s.flows_active));
            flows_created.samples.push((vl.clone(), s.flows_created));
            for (how, n) in s.flows_ended {
                flows_ended.samples.push((format!("{vl},event=\"{how}\""), n));
            }
            datagrams
                .samples
                .push((format!("{vl},direction=\"in\""), s.datagrams_in));
            datagrams
                .samples
                .push((format!("{vl},direction=\"out\""), s.datagrams_out));
            for (reason, n) in s.drops {
                drops.samples.push((format!("{vl},reason=\"{reason}\""), n));
            }
        }
        let counts = spread::state_counts(&table.entries, now);
        for (state, n) in [
            ("healthy", counts.healthy),
            ("ejected", counts.ejected),
            ("check_failing", counts.check_failing),
            ("disabled", counts.disabled),
        ] {
            states.samples.push((format!("{vl},state=\"{state}\""), n as u64));
        }
        let s = spread::spread(&table.entries, now);
        healthy.samples.push((vl.clone(), s.healthy_backends as u64));
        zones.samples.push((vl.clone(), s.zones as u64));
        regions.samples.push((vl.clone(), s.regions as u64));
        racks.samples.push((vl.clone(), s.racks as u64));
        listed_zones.samples.push((vl, s.listed_zones as u64));
    }
    let mut workers = Family::new(
        "halo_worker_connections",
        "gauge",
        "Live client connections per data-plane worker thread (all VIPs): how evenly the workers share them.",
    );
    for (i, n) in crate::dataplane::workers::loads().into_iter().enumerate() {
        workers.samples.push((format!("worker=\"{i}\""), n as u64));
    }
    let mut out = String::new();
    for f in [
        workers,
        connections,
        active,
        up,
        failures,
        ejections,
        check_up,
        check_flips,
        states,
        healthy,
        zones,
        regions,
        racks,
        listed_zones,
        flows_active,
        flows_created,
        flows_ended,
        datagrams,
        drops,
        backend_datagrams,
        backend_bytes,
    ] {
        if f.samples.is_empty() {
            continue;
        }
        out.push_str(&format!("# HELP {} {}\n# TYPE {} {}\n", f.name, f.help, f.name, f.kind));
        for (labels, value) in f.samples {
            out.push_str(&format!("{}{{{labels}}} {value}\n", f.name));
        }
        out.push('\n');
    }
    out
}
