//! Table rebuild + swap time for 10, 1k and 10k backends.
//!
//! For each size, changes one backend's weight (so the table really changes)
//! and times `Vip::set_backends`: the rebuild of the whole table (entries,
//! selector state) plus the atomic swap. Also times the swap alone (one
//! `ArcSwap::store` of a prebuilt table). Prints one JSON object per line:
//! `{"backends":N,"algorithm":"maglev","build_us":..,"swap_ns":..}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use halo_lb::settings::Backend;
use halo_lb::settings::VipSettings;
use halo_lb::settings::{Algorithm, CopyMode, PassiveConfig, ProxyProtocol};
use halo_lb::{Table, Vip};

fn settings(algorithm: Algorithm) -> VipSettings {
    VipSettings {
        algorithm,
        connect_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(300),
        max_connections: 10_000,
        proxy_protocol: ProxyProtocol::Off,
        copy: CopyMode::Buffered,
        retries: 2,
        passive: PassiveConfig::default(),
        zone: None,
        check: None,
    }
}

fn backends(n: usize, bump: u32) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            let addr: SocketAddr = format!("10.{}.{}.{}:8080", i / 65_536, (i / 256) % 256, i % 256)
                .parse()
                .unwrap();
            Backend {
                addr,
                // Alternate one backend's weight so every rebuild changes the table.
                weight: if i == 0 { 1 + bump % 2 } else { 1 },
                zone: None,
                region: None,
                rack: None,
            }
        })
        .collect()
}

fn main() {
    for algorithm in [Algorithm::Maglev, Algorithm::RoundRobin] {
        for n in [10usize, 1_000, 10_000] {
            let vip = Vip::new("bench", settings(algorithm), backends(n, 0));
            let rounds = if n >= 10_000 { 10 } else { 50 };
            let mut total = Duration::ZERO;
            for r in 1..=rounds {
                let set = backends(n, r);
                let start = Instant::now();
                let swapped = vip.set_backends(set);
                total += start.elapsed();
                assert!(swapped, "every round changes the table");
            }
            let build_us = total.as_secs_f64() * 1e6 / f64::from(rounds);

            // The swap alone: store prebuilt tables.
            let prebuilt: Vec<Arc<Table>> = (0..2).map(|_| vip.table()).collect();
            let cell = ArcSwap::new(Arc::clone(&prebuilt[0]));
            let swaps = 100_000u32;
            let start = Instant::now();
            for i in 0..swaps {
                cell.store(Arc::clone(&prebuilt[(i % 2) as usize]));
            }
            let swap_ns = start.elapsed().as_secs_f64() * 1e9 / f64::from(swaps);
            let name = serde_json::to_value(algorithm).unwrap();
            println!(
                "{}",
                serde_json::json!({
                    "backends": n,
                    "algorithm": name,
                    "build_us": (build_us * 10.0).round() / 10.0,
                    "swap_ns": (swap_ns * 10.0).round() / 10.0,
                })
            );
        }
    }
}
