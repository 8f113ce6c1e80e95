//! Table rebuild + swap time for 10, 1k and 10k backends.
//!
//! For each size, changes one backend's weight (so the table really changes)
//! and times `Vip::set_backends`: the rebuild of the whole table (entries,
//! selector state) plus the atomic swap. Also times the swap alone (one
//! `ArcSwap::store` of a prebuilt table). For Maglev, whose tables are
//! updated from the published one (see `halo_lb`'s `balance::maglev`), it
//! also times the removal of one backend (every later entry shifts, so the
//! whole table is remapped) and a full build (a VIP's first table), and
//! measures the balance (the spread of lookup slots per backend: most ÷
//! fewest − 1) and the disruption (the share of 200,000 clients that change
//! backend when one of the N backends goes, against the ideal 1/N). Prints
//! one JSON object per line: `{"backends":N,"algorithm":"maglev",
//! "build_us":..,"swap_ns":..,"remove_us":..,"full_build_us":..,"slots":..,
//! "spread_pct":..,"moved_pct":..,"ideal_moved_pct":..}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use halo_lb::settings::Backend;
use halo_lb::settings::VipSettings;
use halo_lb::settings::{Algorithm, CopyMode, PassiveConfig, ProxyProtocol, UdpSettings};
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
        udp: UdpSettings::default(),
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

/// Maglev over `n` equal backends.
struct Balance {
    /// Lookup-table size.
    slots: usize,
    /// Most slots per backend ÷ fewest − 1.
    spread: f64,
    /// Share of clients moved when the middle backend goes.
    moved: f64,
    /// Time of that removal (rebuild + swap), the median of 7.
    remove: Duration,
    /// Time of the VIP's first table (a full build).
    full_build: Duration,
}

fn balance(n: usize) -> Balance {
    let all = backends(n, 0);
    let start = Instant::now();
    let vip = Vip::new("balance", settings(Algorithm::Maglev), all.clone());
    let full_build = start.elapsed();
    let (size, slots) = vip.table().maglev_slots().expect("a maglev table");
    let most = slots.iter().map(|s| s.1).max().unwrap_or(0);
    let fewest = slots.iter().map(|s| s.1).min().unwrap_or(0).max(1);
    let spread = most as f64 / fewest as f64 - 1.0;
    let clients: Vec<SocketAddr> = (0..200_000u32)
        .map(|i| SocketAddr::from(([100, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40_000)))
        .collect();
    let table = vip.table();
    let before: Vec<_> = clients.iter().map(|c| table.route(*c)).collect();
    let gone = all[n / 2].addr;
    let rest: Vec<Backend> = all.iter().filter(|b| b.addr != gone).cloned().collect();
    // The backend goes and comes back a few times (as a flapping health
    // check makes it); the median removal is the figure. The last removal
    // stays for the disruption count below.
    let mut removals = Vec::new();
    for round in 0..7 {
        if round > 0 {
            vip.set_backends(all.clone());
        }
        let start = Instant::now();
        vip.set_backends(rest.clone());
        removals.push(start.elapsed());
    }
    removals.sort();
    let remove = removals[removals.len() / 2];
    let table = vip.table();
    let moved = clients
        .iter()
        .zip(&before)
        .filter(|(c, b)| table.route(**c) != **b)
        .count();
    Balance {
        slots: size,
        spread,
        moved: moved as f64 / clients.len() as f64,
        remove,
        full_build,
    }
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
            let mut row = serde_json::json!({
                "backends": n,
                "algorithm": name,
                "build_us": (build_us * 10.0).round() / 10.0,
                "swap_ns": (swap_ns * 10.0).round() / 10.0,
            });
            if algorithm == Algorithm::Maglev {
                let b = balance(n);
                row["remove_us"] = ((b.remove.as_secs_f64() * 1e7).round() / 10.0).into();
                row["full_build_us"] = ((b.full_build.as_secs_f64() * 1e7).round() / 10.0).into();
                row["slots"] = b.slots.into();
                row["spread_pct"] = ((b.spread * 1e4).round() / 100.0).into();
                row["moved_pct"] = ((b.moved * 1e4).round() / 100.0).into();
                row["ideal_moved_pct"] = ((1e4 / n as f64).round() / 100.0).into();
            }
            println!("{row}");
        }
    }
}
