//! Fault-domain spread: over how many zones, regions and racks the backends
//! a VIP can pick right now are spread.
//!
//! Health moves without a table rebuild (passive ejection, active checks),
//! so the spread is computed from a table and the live state of its
//! backends whenever it is asked for (`/status`, `/metrics`): one pass over
//! the entries, no cache to go stale.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::balance::backend::Entry;

/// The fault-domain spread of a VIP's healthy backends: those that are
/// neither disabled, nor ejected, nor failing their active check. A backend
/// without a zone (region, rack) adds none to that count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spread {
    /// Distinct zones among the healthy backends.
    pub zones: usize,
    /// Distinct regions among the healthy backends.
    pub regions: usize,
    /// Distinct racks among the healthy backends.
    pub racks: usize,
    /// Healthy backends.
    pub healthy_backends: usize,
    /// Distinct zones among all the table's backends, whatever their
    /// health: more than `zones` means a zone has lost all its backends.
    pub listed_zones: usize,
}

/// How many backends of a table are in each state at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StateCounts {
    /// Picked.
    pub(crate) healthy: usize,
    /// Passively ejected (and not disabled).
    pub(crate) ejected: usize,
    /// Failing the active check (and not disabled).
    pub(crate) check_failing: usize,
    /// Disabled by an operator.
    pub(crate) disabled: usize,
}

/// Whether an entry can be picked at `now` (not disabled, not ejected, its
/// active check not failing).
pub(crate) fn healthy(e: &Entry, now: Instant) -> bool {
    !e.disabled && e.state.available(now)
}

/// The spread of `entries` at `now`.
pub(crate) fn spread(entries: &[Entry], now: Instant) -> Spread {
    let mut zones = BTreeSet::new();
    let mut regions = BTreeSet::new();
    let mut racks = BTreeSet::new();
    let mut listed = BTreeSet::new();
    let mut healthy_backends = 0;
    for e in entries {
        if let Some(z) = &e.backend.zone {
            listed.insert(z.as_str());
        }
        if !healthy(e, now) {
            continue;
        }
        healthy_backends += 1;
        zones.extend(e.backend.zone.as_deref());
        regions.extend(e.backend.region.as_deref());
        racks.extend(e.backend.rack.as_deref());
    }
    Spread {
        zones: zones.len(),
        regions: regions.len(),
        racks: racks.len(),
        healthy_backends,
        listed_zones: listed.len(),
    }
}

/// How many of `entries` are in each state at `now`. Disabled wins over
/// the rest, a failing check over an ejection, as `/status` shows them.
pub(crate) fn state_counts(entries: &[Entry], now: Instant) -> StateCounts {
    let mut c = StateCounts::default();
    for e in entries {
        if e.disabled {
            c.disabled += 1;
        } else if e.state.check_failing() {
            c.check_failing += 1;
        } else if e.state.is_ejected(now) {
            c.ejected += 1;
        } else {
            c.healthy += 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::balance::backend::{Backend, BackendState};
    use crate::settings::PassiveConfig;

    fn entry(i: u16, zone: Option<&str>, region: Option<&str>, rack: Option<&str>) -> Entry {
        let addr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
        Entry {
            backend: Backend {
                addr,
                weight: 1,
                zone: zone.map(str::to_owned),
                region: region.map(str::to_owned),
                rack: rack.map(str::to_owned),
            },
            state: Arc::new(BackendState::new(addr)),
            disabled: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_healthy_backends_count_and_unknown_domains_add_nothing() {
        let mut entries = vec![
            entry(1, Some("a"), Some("eu"), Some("r1")),
            entry(2, Some("a"), Some("eu"), Some("r2")),
            entry(3, Some("b"), Some("eu"), Some("r3")),
            entry(4, Some("c"), Some("us"), None),
            entry(5, None, None, None),
        ];
        let now = Instant::now();
        assert_eq!(
            spread(&entries, now),
            Spread {
                zones: 3,
                regions: 2,
                racks: 3,
                healthy_backends: 5,
                listed_zones: 3
            }
        );

        // Zone c goes: disabled. Zone b goes: its check fails. r1 goes: ejected.
        entries[3].disabled = true;
        entries[2].state.set_check_failing(true);
        let policy = PassiveConfig {
            eject_after: 1,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(10),
        };
        assert!(entries[0].state.connect_failed(now, &policy).is_some());
        assert_eq!(
            spread(&entries, now),
            Spread {
                zones: 1,
                regions: 1,
                racks: 1,
                healthy_backends: 2,
                listed_zones: 3
            }
        );
        assert_eq!(
            state_counts(&entries, now),
            StateCounts {
                healthy: 2,
                ejected: 1,
                check_failing: 1,
                disabled: 1
            }
        );

        // The ejection runs out by time alone: the spread follows.
        let later = now + Duration::from_secs(11);
        assert_eq!(spread(&entries, later).racks, 2);
        assert_eq!(spread(&entries, later).healthy_backends, 3);
    }
}
