//! Backend selection: the precomputed state of each algorithm, built once per
//! table off the data path, and the per-connection pick.
//!
//! Every pick skips backends that are ejected, failing their active check,
//! or already tried for this connection. If that leaves nothing, it falls
//! back to those unavailable backends ("panic mode", as Envoy calls it): a
//! backend that refused a moment ago is a better bet than refusing the
//! client outright.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::time::Instant;

use crate::balance::backend::Entry;
use crate::balance::hash::{client_hash, flow_hash};
use crate::balance::maglev::{Maglev, MaglevError};
use crate::settings::Algorithm;

/// How many lookup slots a Maglev pick walks from the client's slot before
/// it scans the selectable backends instead. The table is ≥ 100× the
/// backends, so with most of them unavailable an unbounded walk could touch
/// millions of slots per pick.
const MAGLEV_WALK: usize = 64;

/// Why a selector could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SelectorError {
    /// Maglev's lookup table could not be filled.
    #[error(transparent)]
    Maglev(#[from] MaglevError),
}

/// Precomputed selection state; one per table, immutable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Selector {
    /// A weighted interleaving of selectable indices, walked by a counter.
    RoundRobin {
        /// Backend indices, each appearing `weight` times, interleaved.
        wheel: Vec<u32>,
    },
    /// Scan for the fewest live connections per weight.
    LeastConn,
    /// Two random picks, the less loaded wins.
    P2c,
    /// Consistent hashing of the client address.
    Maglev(Maglev),
}

impl Selector {
    /// Builds the state of `algorithm` over `entries`, using only the indices
    /// in `selectable`. `previous` is the published selector: Maglev
    /// updates its table from it rather than building afresh (see
    /// [`crate::balance::maglev`]).
    pub(crate) fn build(
        algorithm: Algorithm,
        entries: &[Entry],
        selectable: &[u32],
        previous: Option<&Selector>,
    ) -> Result<Selector, SelectorError> {
        Ok(match algorithm {
            Algorithm::RoundRobin => Selector::RoundRobin {
                wheel: weighted_wheel(entries, selectable),
            },
            Algorithm::LeastConn => Selector::LeastConn,
            Algorithm::P2c => Selector::P2c,
            Algorithm::Maglev => Selector::Maglev(match previous {
                Some(Selector::Maglev(table)) => table.update(entries, selectable)?,
                _ => Maglev::build(entries, selectable)?,
            }),
        })
    }
}

/// What a pick needs besides the table.
#[derive(Debug)]
pub(crate) struct PickContext<'a> {
    /// The client's address (Maglev hashes its IP).
    pub client: SocketAddr,
    /// The VIP's round-robin position; survives table swaps.
    pub cursor: &'a AtomicUsize,
    /// The time ejections are judged at.
    pub now: Instant,
    /// Backend indices already tried for this connection.
    pub tried: &'a [usize],
    /// Maglev hashes the client's port too: a UDP flow is an address and a
    /// port, and two flows of one host may go to different backends.
    pub by_port: bool,
}

/// Picks a backend index among `selectable` entries, or `None` when every
/// selectable backend has been tried.
pub(crate) fn pick(selector: &Selector, entries: &[Entry], selectable: &[u32], ctx: &PickContext<'_>) -> Option<usize> {
    if selectable.is_empty() {
        return None;
    }
    let fresh = |i: usize| !ctx.tried.contains(&i);
    pick_available(selector, entries, selectable, ctx)
        // Panic mode: nothing untried is available; try unavailable ones.
        .or_else(|| pick_with(selector, entries, selectable, ctx, &fresh))
}

/// Like [`pick`] without panic mode: only backends that are available
/// (neither ejected nor failing their active check) and not yet tried.
pub(crate) fn pick_available(
    selector: &Selector,
    entries: &[Entry],
    selectable: &[u32],
    ctx: &PickContext<'_>,
) -> Option<usize> {
    if selectable.is_empty() {
        return None;
    }
    let usable = |i: usize| !ctx.tried.contains(&i) && entries[i].state.available(ctx.now);
    pick_with(selector, entries, selectable, ctx, &usable)
}

fn pick_with(
    selector: &Selector,
    entries: &[Entry],
    selectable: &[u32],
    ctx: &PickContext<'_>,
    ok: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    match selector {
        Selector::RoundRobin { wheel } => {
            let start = ctx.cursor.fetch_add(1, Ordering::Relaxed);
            (0..wheel.len())
                .map(|k| wheel[(start.wrapping_add(k)) % wheel.len()] as usize)
                .find(|&i| ok(i))
        }
        Selector::LeastConn => least_loaded(entries, selectable, ok),
        Selector::P2c => {
            let n = selectable.len();
            // A few draws cover the common case without allocating; if they
            // keep hitting unusable backends, scan.
            for _ in 0..4 {
                let a = selectable[fastrand::usize(..n)] as usize;
                if n == 1 {
                    return ok(a).then_some(a);
                }
                let mut b = selectable[fastrand::usize(..n - 1)] as usize;
                if b == a {
                    b = selectable[n - 1] as usize;
                }
                match (ok(a), ok(b)) {
                    (true, true) => return Some(if load_less(&entries[b], &entries[a]) { b } else { a }),
                    (true, false) => return Some(a),
                    (false, true) => return Some(b),
                    (false, false) => {}
                }
            }
            least_loaded(entries, selectable, ok)
        }
        Selector::Maglev(table) => {
            let m = table.len();
            let hash = if ctx.by_port {
                flow_hash(ctx.client)
            } else {
                client_hash(ctx.client.ip())
            };
            let slot = (hash % m as u64) as usize;
            // Walk on from the client's slot: deterministic per client, and
            // spreads an unusable backend's clients like the table does. The
            // walk is bounded; past it, scan the selectable set from a
            // per-client offset (still deterministic, O(backends)).
            (0..MAGLEV_WALK.min(m))
                .map(|k| table.entry((slot + k) % m))
                .find(|&i| ok(i))
                .or_else(|| {
                    let n = selectable.len();
                    let start = (hash.rotate_left(32) % n as u64) as usize;
                    (0..n).map(|k| selectable[(start + k) % n] as usize).find(|&i| ok(i))
                })
        }
    }
}

/// `a` carries less load per weight than `b`.
fn load_less(a: &Entry, b: &Entry) -> bool {
    // (active_a + 1) / w_a < (active_b + 1) / w_b, in integers.
    (a.state.active() as u64 + 1) * u64::from(b.backend.weight)
        < (b.state.active() as u64 + 1) * u64::from(a.backend.weight)
}

fn least_loaded(entries: &[Entry], selectable: &[u32], ok: &dyn Fn(usize) -> bool) -> Option<usize> {
    // Start at a random offset so ties do not all go to the first backend.
    let n = selectable.len();
    let start = fastrand::usize(..n);
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = selectable[(start + k) % n] as usize;
        if ok(i) && best.is_none_or(|b| load_less(&entries[i], &entries[b])) {
            best = Some(i);
        }
    }
    best
}

/// Stride scheduling: each backend appears `weight / gcd` times, spread
/// evenly (the next slot goes to the backend with the smallest virtual
/// finish time). O(total · log n).
fn weighted_wheel(entries: &[Entry], selectable: &[u32]) -> Vec<u32> {
    let weights: Vec<u64> = selectable
        .iter()
        .map(|&i| u64::from(entries[i as usize].backend.weight.max(1)))
        .collect();
    let g = weights.iter().copied().fold(0, gcd).max(1);
    if weights.iter().all(|&w| w == g) {
        return selectable.to_vec();
    }
    let total: u64 = weights.iter().map(|w| w / g).sum();
    // Strides in a common unit: lcm-free, using total as the numerator.
    let mut heap: BinaryHeap<Reverse<(u128, usize)>> = weights
        .iter()
        .enumerate()
        .map(|(k, &w)| Reverse(((u128::from(total) << 20) / u128::from(w / g), k)))
        .collect();
    let mut wheel = Vec::with_capacity(total as usize);
    while (wheel.len() as u64) < total {
        let Reverse((pass, k)) = heap.pop().expect("heap holds every backend");
        wheel.push(selectable[k]);
        let stride = (u128::from(total) << 20) / u128::from(weights[k] / g);
        heap.push(Reverse((pass + stride, k)));
    }
    wheel
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::balance::backend::{Backend, BackendState};

    fn entries(n: usize, weight: impl Fn(usize) -> u32) -> Vec<Entry> {
        (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("10.0.{}.{}:80", i / 250, i % 250 + 1).parse().unwrap();
                Entry {
                    backend: Backend {
                        addr,
                        weight: weight(i),
                        zone: None,
                        region: None,
                        rack: None,
                    },
                    state: Arc::new(BackendState::new(addr)),
                    disabled: false,
                }
            })
            .collect()
    }

    fn all(entries: &[Entry]) -> Vec<u32> {
        (0..entries.len() as u32).collect()
    }

    fn client(i: u32) -> SocketAddr {
        SocketAddr::from(([100, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40000))
    }

    fn counts(algorithm: Algorithm, e: &[Entry], picks: u32) -> HashMap<usize, u32> {
        let sel = all(e);
        let s = Selector::build(algorithm, e, &sel, None).unwrap();
        let cursor = AtomicUsize::new(0);
        let mut counts = HashMap::new();
        for i in 0..picks {
            let ctx = PickContext {
                client: client(i),
                cursor: &cursor,
                now: Instant::now(),
                tried: &[],
                by_port: false,
            };
            *counts.entry(pick(&s, e, &sel, &ctx).unwrap()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn round_robin_is_exact_and_honours_weights() {
        let e = entries(3, |i| [1, 2, 3][i]);
        let c = counts(Algorithm::RoundRobin, &e, 600);
        assert_eq!((c[&0], c[&1], c[&2]), (100, 200, 300));
        // Interleaved, not bursty: in any window of 6 picks each backend appears by weight.
        let sel = all(&e);
        let Selector::RoundRobin { wheel } = Selector::build(Algorithm::RoundRobin, &e, &sel, None).unwrap() else {
            unreachable!()
        };
        assert_eq!(wheel.len(), 6);
        assert_ne!(wheel[0], wheel[1], "smooth interleaving: {wheel:?}");
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_per_weight() {
        let e = entries(3, |_| 1);
        let _busy: Vec<_> = (0..3).map(|_| e[0].state.start_connection()).collect();
        let _one = e[1].state.start_connection();
        let c = counts(Algorithm::LeastConn, &e, 50);
        assert_eq!(c.get(&2), Some(&50), "the idle backend wins every time: {c:?}");
        // With weights, load is judged per weight: 4 conns on weight 4 beats 2 on weight 1.
        let e = entries(2, |i| [4, 1][i]);
        let _a: Vec<_> = (0..4).map(|_| e[0].state.start_connection()).collect();
        let _b: Vec<_> = (0..2).map(|_| e[1].state.start_connection()).collect();
        assert_eq!(counts(Algorithm::LeastConn, &e, 20).get(&0), Some(&20));
    }

    #[test]
    fn p2c_spreads_evenly_and_avoids_the_loaded_backend() {
        let e = entries(4, |_| 1);
        let c = counts(Algorithm::P2c, &e, 40_000);
        for i in 0..4 {
            let share = f64::from(c[&i]) / 40_000.0;
            assert!((share - 0.25).abs() < 0.02, "backend {i}: {share}");
        }
        // A backend with many live connections loses every comparison it enters.
        let _busy: Vec<_> = (0..100).map(|_| e[0].state.start_connection()).collect();
        let c = counts(Algorithm::P2c, &e, 4000);
        assert_eq!(c.get(&0), None, "{c:?}");
    }

    #[test]
    fn maglev_is_balanced_and_deterministic() {
        let e = entries(10, |_| 1);
        let sel = all(&e);
        let Selector::Maglev(table) = Selector::build(Algorithm::Maglev, &e, &sel, None).unwrap() else {
            unreachable!()
        };
        assert_eq!(table.len(), 65_537);
        let slots = table.slots_by_entry(e.len());
        let ideal = 65_537.0 / 10.0;
        for (i, &s) in slots.iter().enumerate() {
            assert!((s as f64 / ideal - 1.0).abs() < 0.03, "backend {i} owns {s} slots");
        }
        // Same inputs, same table: both instances of a pair agree.
        assert_eq!(
            Selector::build(Algorithm::Maglev, &e, &sel, None).unwrap(),
            Selector::build(Algorithm::Maglev, &e, &sel, None).unwrap()
        );
        // Weights shift shares.
        let w = entries(2, |i| [3, 1][i]);
        let c = counts(Algorithm::Maglev, &w, 40_000);
        let share = f64::from(c[&0]) / 40_000.0;
        assert!((share - 0.75).abs() < 0.03, "weighted share {share}");
    }

    /// For each of many clients, the backend address Maglev maps it to.
    fn maglev_map(e: &[Entry], sel: &[u32], clients: u32) -> Vec<SocketAddr> {
        let s = Selector::build(Algorithm::Maglev, e, sel, None).unwrap();
        let cursor = AtomicUsize::new(0);
        (0..clients)
            .map(|i| {
                let ctx = PickContext {
                    client: client(i),
                    cursor: &cursor,
                    now: Instant::now(),
                    tried: &[],
                    by_port: false,
                };
                e[pick(&s, e, sel, &ctx).unwrap()].backend.addr
            })
            .collect()
    }

    #[test]
    fn maglev_removing_one_of_n_remaps_about_one_nth() {
        for n in [5usize, 10, 30] {
            let e = entries(n, |_| 1);
            let before = maglev_map(&e, &all(&e), 20_000);
            let removed = e[n / 2].backend.addr;
            let sel: Vec<u32> = all(&e).into_iter().filter(|&i| i as usize != n / 2).collect();
            let after = maglev_map(&e, &sel, 20_000);
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let moved_from_others = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b != a && **b != removed)
                .count();
            let share = moved as f64 / 20_000.0;
            let ideal = 1.0 / n as f64;
            assert!(share < ideal * 1.25 + 0.01, "n={n}: {share} moved, ideal {ideal}");
            assert!(
                (moved_from_others as f64 / 20_000.0) < 0.02,
                "n={n}: clients of remaining backends mostly stay: {moved_from_others}"
            );
        }
    }

    #[test]
    fn tried_and_ejected_backends_are_skipped_with_panic_mode_as_last_resort() {
        let e = entries(3, |_| 1);
        let sel = all(&e);
        let now = Instant::now();
        let policy = crate::settings::PassiveConfig {
            eject_after: 1,
            base_ejection: std::time::Duration::from_secs(60),
            max_ejection: std::time::Duration::from_secs(60),
        };
        e[0].state.connect_failed(now, &policy);
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::LeastConn,
            Algorithm::P2c,
            Algorithm::Maglev,
        ] {
            let s = Selector::build(algorithm, &e, &sel, None).unwrap();
            let cursor = AtomicUsize::new(0);
            for i in 0..200 {
                let ctx = PickContext {
                    client: client(i),
                    cursor: &cursor,
                    now,
                    tried: &[1],
                    by_port: false,
                };
                assert_eq!(pick(&s, &e, &sel, &ctx), Some(2), "{algorithm:?}");
            }
            // Everything else tried: the ejected backend is still better than nothing.
            let ctx = PickContext {
                client: client(0),
                cursor: &cursor,
                now,
                tried: &[1, 2],
                by_port: false,
            };
            assert_eq!(pick(&s, &e, &sel, &ctx), Some(0), "{algorithm:?} panic mode");
            let ctx = PickContext {
                client: client(0),
                cursor: &cursor,
                now,
                tried: &[0, 1, 2],
                by_port: false,
            };
            assert_eq!(pick(&s, &e, &sel, &ctx), None);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn never_picks_an_ejected_backend_while_a_healthy_one_remains(
            n in 2usize..12,
            ejected in proptest::collection::vec(any::<bool>(), 12),
            algo in 0usize..4,
            clients in proptest::collection::vec(any::<u32>(), 1..50),
        ) {
            let e = entries(n, |i| (i % 3 + 1) as u32);
            let now = Instant::now();
            let policy = crate::settings::PassiveConfig {
                eject_after: 1,
                base_ejection: std::time::Duration::from_secs(60),
                max_ejection: std::time::Duration::from_secs(60),
            };
            let mut any_healthy = false;
            for i in 0..n {
                if ejected[i] { e[i].state.connect_failed(now, &policy); } else { any_healthy = true; }
            }
            let algorithm = [Algorithm::RoundRobin, Algorithm::LeastConn, Algorithm::P2c, Algorithm::Maglev][algo];
            let sel = all(&e);
            let s = Selector::build(algorithm, &e, &sel, None).unwrap();
            let cursor = AtomicUsize::new(0);
            for c in clients {
                let ctx = PickContext { client: client(c), cursor: &cursor, now, tried: &[], by_port: false };
                let i = pick(&s, &e, &sel, &ctx).expect("a pick");
                if any_healthy {
                    prop_assert!(!ejected[i], "{:?} picked ejected {}", algorithm, i);
                }
            }
        }
    }

    #[test]
    fn maglev_pick_is_bounded_when_most_backends_are_unavailable() {
        // 2,000 backends, all but one tried: the pick still finds the last
        // one (through the bounded walk, then the scan), deterministically.
        let e = entries(2_000, |_| 1);
        let sel = all(&e);
        let s = Selector::build(Algorithm::Maglev, &e, &sel, None).unwrap();
        let tried: Vec<usize> = (0..2_000).filter(|&i| i != 1_234).collect();
        let cursor = AtomicUsize::new(0);
        for c in 0..50 {
            let ctx = PickContext {
                client: client(c),
                cursor: &cursor,
                now: Instant::now(),
                tried: &tried,
                by_port: false,
            };
            assert_eq!(pick_available(&s, &e, &sel, &ctx), Some(1_234));
        }
    }

    #[test]
    fn p2c_compares_two_distinct_backends() {
        // Load every backend but one: if p2c ever compared a backend with
        // itself, a loaded backend could win; the idle one must win every draw
        // it is in, which is 1 - (1 - 1/n)(1 - 1/(n-1)) = 2/n of them.
        fastrand::seed(7);
        for n in 2usize..20 {
            let e = entries(n, |_| 1);
            let _load: Vec<_> = (1..n)
                .flat_map(|i| (0..5).map(move |_| i))
                .map(|i| e[i].state.start_connection())
                .collect();
            let sel = all(&e);
            let cursor = AtomicUsize::new(0);
            let ctx = PickContext {
                client: client(0),
                cursor: &cursor,
                now: Instant::now(),
                tried: &[],
                by_port: false,
            };
            let draws = 20_000;
            let idle_wins = (0..draws)
                .filter(|_| pick(&Selector::P2c, &e, &sel, &ctx) == Some(0))
                .count();
            let share = idle_wins as f64 / f64::from(draws);
            let expected = 2.0 / n as f64;
            assert!(
                (share - expected).abs() < 0.02,
                "n={n}: idle share {share}, expected {expected}"
            );
        }
    }
}
