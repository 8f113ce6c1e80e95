//! Zone-aware routing: a VIP prefers backends in the balancer's own zone
//! while enough of them are healthy, and spills over to every zone when
//! they are not.
//!
//! The rule, per pick: route locally while
//! `healthy local backends ≥ max(1, ⌈zone_min_healthy × local backends⌉)`,
//! where the local backends are the table's entries whose zone is the
//! balancer's (`zone` in the config), disabled ones included, and healthy
//! means neither disabled, ejected, nor failing its active check. Otherwise
//! the pick is made over every zone (the local backends included), as if
//! zone awareness were off. All or nothing, deliberately: Envoy's
//! proportional spill-over needs to know how the balancers themselves are
//! spread over zones, which halo does not, and a binary rule is one an
//! operator can predict from `/status`.
//!
//! Health changes without a table rebuild (ejections come and go with
//! failed connects and time, active checks flip), so the decision cannot be
//! precomputed with the table. The table precomputes the local subset and
//! its own selector; the decision itself is cached in one atomic word and
//! recomputed (a scan of the local backends) only when the process-wide
//! [`health_epoch`] moved, when the earliest local ejection runs out, or
//! after [`MAX_DECISION_AGE`]. A pick therefore costs two atomic loads on
//! top of the algorithm's own work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use crate::balance::backend::health_epoch;
use crate::balance::backend::Entry;
use crate::balance::selection::{Selector, SelectorError};
use crate::settings::{Algorithm, ZonePolicy};

/// The longest a cached decision is trusted without recomputing. The epoch
/// and the ejection deadline already make the cache exact; this bounds the
/// damage of anything they miss (two recomputations racing across an
/// epoch bump) to a fraction of a second.
pub(crate) const MAX_DECISION_AGE: Duration = Duration::from_millis(250);

/// A table's precomputed zone state: the local subset, its selector, and
/// the cached decision.
#[derive(Debug)]
pub(crate) struct ZoneRouting {
    policy: ZonePolicy,
    /// Local entries, disabled ones included: the denominator.
    listed: usize,
    /// Healthy local backends needed to route locally.
    needed: usize,
    /// Local entries that are not disabled.
    selectable: Vec<u32>,
    selector: Selector,
    /// The cached decision, see [`Cached`].
    cache: AtomicU64,
}

/// Where a VIP's picks currently go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// To backends in the balancer's zone.
    Local,
    /// To every zone: too few local backends are healthy.
    AllZones,
}

/// The zone state of one VIP, for `/status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ZoneStatus {
    /// The balancer's zone.
    pub zone: String,
    /// Where picks go now.
    pub routing: Routing,
    /// Backends of the table in the local zone, disabled ones included.
    pub local_backends: usize,
    /// Of those, the ones neither disabled, ejected nor failing a check.
    pub healthy_local: usize,
    /// Healthy local backends needed to route locally.
    pub needed: usize,
    /// The configured fraction (`zone_min_healthy`).
    pub min_healthy: f64,
}

/// Milliseconds since a process-wide origin (tokio's clock, so tests with a
/// paused clock see the same time as the picks they make).
fn millis(t: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(t.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

/// The cached decision in one word, so readers never see the decision of
/// one computation with the validity of another: bit 0 is the decision
/// (1 = local), bits 1..23 the low 22 bits of the health epoch it was made
/// at, bits 23..64 the millisecond (see [`millis`]) until which it holds.
/// Zero is "never computed" (valid until 0 ms: already expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cached {
    local: bool,
    epoch: u64,
    valid_until_ms: u64,
}

const EPOCH_BITS: u32 = 22;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
const TIME_SHIFT: u32 = EPOCH_BITS + 1;

impl Cached {
    fn pack(self) -> u64 {
        (self.valid_until_ms.min(u64::MAX >> TIME_SHIFT) << TIME_SHIFT)
            | ((self.epoch & EPOCH_MASK) << 1)
            | u64::from(self.local)
    }

    fn unpack(word: u64) -> Cached {
        Cached {
            local: word & 1 == 1,
            epoch: (word >> 1) & EPOCH_MASK,
            valid_until_ms: word >> TIME_SHIFT,
        }
    }
}

impl ZoneRouting {
    /// Precomputes the local subset of `entries` for `policy`.
    pub(crate) fn build(
        policy: &ZonePolicy,
        algorithm: Algorithm,
        entries: &[Entry],
        previous: Option<&Selector>,
    ) -> Result<ZoneRouting, SelectorError> {
        let local = |e: &Entry| e.backend.zone.as_deref() == Some(policy.zone.as_str());
        let listed = entries.iter().filter(|e| local(e)).count();
        let selectable: Vec<u32> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| local(e) && !e.disabled)
            .map(|(i, _)| u32::try_from(i).expect("fewer than 2^32 backends"))
            .collect();
        let selector = Selector::build(algorithm, entries, &selectable, previous)?;
        Ok(ZoneRouting {
            needed: policy.needed(listed),
            policy: policy.clone(),
            listed,
            selectable,
            selector,
            cache: AtomicU64::new(0),
        })
    }

    /// The local backends that may be picked.
    pub(crate) fn selectable(&self) -> &[u32] {
        &self.selectable
    }

    /// The selector over [`ZoneRouting::selectable`].
    pub(crate) fn selector(&self) -> &Selector {
        &self.selector
    }

    /// Whether picks at `now` go to the local zone. Cheap: a cached answer
    /// unless backend health moved since it was computed.
    pub(crate) fn routes_locally(&self, entries: &[Entry], now: Instant) -> bool {
        if self.selectable.is_empty() {
            return false;
        }
        let epoch = health_epoch();
        let now_ms = millis(now);
        let cached = Cached::unpack(self.cache.load(Ordering::Acquire));
        if cached.epoch == epoch & EPOCH_MASK && now_ms < cached.valid_until_ms {
            return cached.local;
        }
        let (healthy, next_change) = self.count(entries, now);
        let local = healthy >= self.needed;
        let max_age = now + MAX_DECISION_AGE;
        let valid_until = next_change.map_or(max_age, |t| t.min(max_age));
        self.cache.store(
            Cached {
                local,
                epoch,
                valid_until_ms: millis(valid_until),
            }
            .pack(),
            Ordering::Release,
        );
        local
    }

    /// Healthy local backends at `now`, and the earliest moment an ejection
    /// among them runs out (when the count may rise with no event).
    fn count(&self, entries: &[Entry], now: Instant) -> (usize, Option<Instant>) {
        let mut healthy = 0;
        let mut next_change: Option<Instant> = None;
        for &i in &self.selectable {
            let state = &entries[i as usize].state;
            if state.available(now) {
                healthy += 1;
            } else if let Some(until) = state.ejected_until(now) {
                next_change = Some(next_change.map_or(until, |t| t.min(until)));
            }
        }
        (healthy, next_change)
    }

    /// The state at `now`, computed afresh.
    pub(crate) fn status(&self, entries: &[Entry], now: Instant) -> ZoneStatus {
        let (healthy, _) = self.count(entries, now);
        ZoneStatus {
            zone: self.policy.zone.clone(),
            routing: if !self.selectable.is_empty() && healthy >= self.needed {
                Routing::Local
            } else {
                Routing::AllZones
            },
            local_backends: self.listed,
            healthy_local: healthy,
            needed: self.needed,
            min_healthy: self.policy.min_healthy(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::balance::backend::{Backend, BackendState};
    use crate::balance::selection::PickContext;
    use crate::balance::table::Table;
    use crate::settings::PassiveConfig;
    use crate::settings::VipSettings;

    const ALGORITHMS: [Algorithm; 4] = [
        Algorithm::RoundRobin,
        Algorithm::LeastConn,
        Algorithm::P2c,
        Algorithm::Maglev,
    ];

    fn settings(algorithm: Algorithm, min_healthy: f64) -> VipSettings {
        VipSettings {
            algorithm,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_connections: 10,
            proxy_protocol: crate::settings::ProxyProtocol::Off,
            copy: crate::settings::CopyMode::Buffered,
            retries: 2,
            passive: PassiveConfig::default(),
            zone: Some(ZonePolicy::new("a", min_healthy)),
            check: None,
            udp: crate::settings::UdpSettings::default(),
        }
    }

    /// A table of `zones.len()` backends, backend i in zone `zones[i]`.
    fn table(algorithm: Algorithm, min_healthy: f64, zones: &[&str], disabled: &[usize]) -> Table {
        let entries = zones
            .iter()
            .enumerate()
            .map(|(i, z)| {
                let addr: SocketAddr = format!("10.1.0.{}:80", i + 1).parse().unwrap();
                Entry {
                    backend: Backend {
                        addr,
                        weight: 1,
                        zone: Some((*z).to_owned()),
                        region: None,
                        rack: None,
                    },
                    state: Arc::new(BackendState::new(addr)),
                    disabled: disabled.contains(&i),
                }
            })
            .collect();
        Table::build(Arc::new(settings(algorithm, min_healthy)), entries, None).unwrap()
    }

    fn eject(t: &Table, i: usize, now: Instant, for_: Duration) {
        let policy = PassiveConfig {
            eject_after: 1,
            base_ejection: for_,
            max_ejection: for_,
        };
        assert!(t.entries[i].state.connect_failed(now, &policy).is_some());
    }

    fn picks(t: &Table, now: Instant, n: u32) -> HashSet<usize> {
        let cursor = AtomicUsize::new(0);
        (0..n)
            .map(|c| {
                let ctx = PickContext {
                    client: SocketAddr::from(([100, 0, (c >> 8) as u8, c as u8], 1000)),
                    cursor: &cursor,
                    now,
                    tried: &[],
                    by_port: false,
                };
                t.pick(&ctx).expect("a pick")
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_stays_local_while_the_fraction_holds_and_spills_over_after() {
        for algorithm in ALGORITHMS {
            // Three local (0..3), two remote (3, 4); 0.6 × 3 → 2 needed.
            let t = table(algorithm, 0.6, &["a", "a", "a", "b", "b"], &[]);
            let now = Instant::now();
            assert!(picks(&t, now, 300).iter().all(|&i| i < 3), "{algorithm:?}");
            eject(&t, 0, now, Duration::from_secs(60));
            let seen = picks(&t, now, 300);
            assert!(seen.iter().all(|&i| i == 1 || i == 2), "{algorithm:?}: {seen:?}");
            eject(&t, 1, now, Duration::from_secs(60));
            let seen = picks(&t, now, 300);
            assert!(!seen.contains(&0) && !seen.contains(&1), "{algorithm:?}: {seen:?}");
            if algorithm != Algorithm::Maglev {
                // Maglev maps these clients as it likes; the others spread.
                assert!(
                    seen.contains(&3) || seen.contains(&4),
                    "{algorithm:?}: spills over: {seen:?}"
                );
            }
            let status = t.zone_status(now).unwrap();
            assert_eq!(status.routing, Routing::AllZones);
            assert_eq!((status.local_backends, status.healthy_local, status.needed), (3, 1, 2));
            // A successful connect re-admits one: local again.
            t.entries[1].state.connect_succeeded();
            assert!(picks(&t, now, 300).iter().all(|&i| i == 1 || i == 2), "{algorithm:?}");
            assert_eq!(t.zone_status(now).unwrap().routing, Routing::Local);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_that_runs_out_brings_traffic_back_without_any_event() {
        let t = table(Algorithm::RoundRobin, 1.0, &["a", "a", "b"], &[]);
        let now = Instant::now();
        eject(&t, 0, now, Duration::from_secs(10));
        assert_eq!(picks(&t, now, 30), HashSet::from([1, 2]), "all zones");
        // Cached while nothing changes...
        assert_eq!(picks(&t, now + Duration::from_secs(9), 30), HashSet::from([1, 2]));
        // ...and recomputed the moment the ejection ends.
        let later = now + Duration::from_secs(10);
        assert_eq!(picks(&t, later, 30), HashSet::from([0, 1]), "local again");
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_local_backends_count_against_the_fraction() {
        let t = table(Algorithm::LeastConn, 0.7, &["a", "a", "a", "b"], &[0]);
        let now = Instant::now();
        // 2 of 3 healthy < ⌈2.1⌉ = 3 needed.
        assert_eq!(picks(&t, now, 100), HashSet::from([1, 2, 3]));
        let t = table(Algorithm::LeastConn, 0.6, &["a", "a", "a", "b"], &[0]);
        assert_eq!(picks(&t, now, 100), HashSet::from([1, 2]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_active_check_counts_as_unhealthy() {
        let t = table(Algorithm::P2c, 1.0, &["a", "a", "b"], &[]);
        let now = Instant::now();
        assert_eq!(picks(&t, now, 200), HashSet::from([0, 1]));
        t.entries[0].state.set_check_failing(true);
        assert_eq!(picks(&t, now, 200), HashSet::from([1, 2]));
        t.entries[0].state.set_check_failing(false);
        assert_eq!(picks(&t, now, 200), HashSet::from([0, 1]));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_leave_the_zone_when_every_local_backend_was_tried() {
        let t = table(Algorithm::RoundRobin, 0.5, &["a", "b", "b"], &[]);
        let cursor = AtomicUsize::new(0);
        let ctx = PickContext {
            client: "100.0.0.1:1000".parse().unwrap(),
            cursor: &cursor,
            now: Instant::now(),
            tried: &[0],
            by_port: false,
        };
        let i = t.pick(&ctx).unwrap();
        assert!(i == 1 || i == 2, "{i}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_local_backends_every_zone_is_used() {
        let t = table(Algorithm::RoundRobin, 0.7, &["b", "c"], &[]);
        let now = Instant::now();
        assert_eq!(picks(&t, now, 10), HashSet::from([0, 1]));
        assert_eq!(t.zone_status(now).unwrap().routing, Routing::AllZones);
    }

    #[test]
    fn the_cache_word_round_trips() {
        for c in [
            Cached {
                local: true,
                epoch: 5,
                valid_until_ms: 123_456_789,
            },
            Cached {
                local: false,
                epoch: EPOCH_MASK,
                valid_until_ms: 0,
            },
        ] {
            assert_eq!(Cached::unpack(c.pack()), c);
        }
        assert_eq!(Cached::unpack(0).valid_until_ms, 0, "zero is never valid");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the zones and ejections: local picks exactly when enough
        /// local backends are healthy, and never an unavailable backend
        /// while an available one exists.
        #[test]
        fn the_choice_follows_the_rule_for_every_algorithm(
            zones in proptest::collection::vec(0usize..3, 1..10),
            ejected in proptest::collection::vec(any::<bool>(), 10),
            min_healthy in 0.0f64..=1.0,
            algo in 0usize..4,
        ) {
            let algorithm = ALGORITHMS[algo];
            let names = ["a", "b", "c"];
            let zones: Vec<&str> = zones.iter().map(|&z| names[z]).collect();
            let t = table(algorithm, min_healthy, &zones, &[]);
            let now = Instant::now();
            for (i, &e) in ejected.iter().enumerate().take(zones.len()) {
                if e {
                    eject(&t, i, now, Duration::from_secs(60));
                }
            }
            let healthy = |i: usize| !ejected[i];
            let local = |i: usize| zones[i] == "a";
            let listed = (0..zones.len()).filter(|&i| local(i)).count();
            let healthy_local = (0..zones.len()).filter(|&i| local(i) && healthy(i)).count();
            let goes_local = listed > 0 && healthy_local >= ZonePolicy::new("a", min_healthy).needed(listed);
            let any_healthy = (0..zones.len()).any(healthy);
            for i in picks(&t, now, 64) {
                if goes_local {
                    prop_assert!(local(i) && healthy(i), "{algorithm:?} picked {i} in local mode");
                } else if any_healthy {
                    prop_assert!(healthy(i), "{algorithm:?} picked unavailable {i}");
                }
            }
        }
    }
}
