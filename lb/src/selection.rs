//! Backend selection: the precomputed state of each algorithm, built once per
//! table off the data path, and the per-connection pick.
//!
//! Every pick skips backends that are ejected or already tried for this
//! connection. If that leaves nothing, it falls back to ejected backends
//! ("panic mode", as Envoy calls it): a backend that refused a moment ago is
//! a better bet than refusing the client outright.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::time::Instant;

use crate::config::Algorithm;
use crate::table::Entry;

/// Maglev lookup-table sizes: primes, the smallest at least 100× the backend
/// count is used, so each backend owns ≥ 100 slots and the spread stays within
/// about 1 % (the paper's guidance).
const MAGLEV_SIZES: [usize; 5] = [65_537, 655_373, 1_310_719, 5_240_389, 10_480_793];

/// Precomputed selection state; one per table, immutable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
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
    Maglev {
        /// Slot → backend index; length is a prime.
        lookup: Vec<u32>,
    },
}

impl Selector {
    /// Builds the state of `algorithm` over `entries`, using only the indices
    /// in `selectable`.
    pub fn build(algorithm: Algorithm, entries: &[Entry], selectable: &[u32]) -> Selector {
        match algorithm {
            Algorithm::RoundRobin => Selector::RoundRobin {
                wheel: weighted_wheel(entries, selectable),
            },
            Algorithm::LeastConn => Selector::LeastConn,
            Algorithm::P2c => Selector::P2c,
            Algorithm::Maglev => Selector::Maglev {
                lookup: maglev_lookup(entries, selectable),
            },
        }
    }
}

/// What a pick needs besides the table.
#[derive(Debug)]
pub struct PickContext<'a> {
    /// The client's address (Maglev hashes its IP).
    pub client: SocketAddr,
    /// The VIP's round-robin position; survives table swaps.
    pub cursor: &'a AtomicUsize,
    /// The time ejections are judged at.
    pub now: Instant,
    /// Backend indices already tried for this connection.
    pub tried: &'a [usize],
}

/// Picks a backend index among `selectable` entries, or `None` when every
/// selectable backend has been tried.
pub fn pick(selector: &Selector, entries: &[Entry], selectable: &[u32], ctx: &PickContext<'_>) -> Option<usize> {
    if selectable.is_empty() {
        return None;
    }
    let fresh = |i: usize| !ctx.tried.contains(&i);
    let usable = |i: usize| fresh(i) && !entries[i].state.is_ejected(ctx.now);
    pick_with(selector, entries, selectable, ctx, &usable)
        // Panic mode: everything usable is ejected; try ejected ones.
        .or_else(|| pick_with(selector, entries, selectable, ctx, &fresh))
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
        Selector::Maglev { lookup } => {
            let m = lookup.len();
            let slot = (client_hash(ctx.client.ip()) % m as u64) as usize;
            // Walk on from the client's slot: deterministic per client, and
            // spreads an unusable backend's clients like the table does.
            (0..m).map(|k| lookup[(slot + k) % m] as usize).find(|&i| ok(i))
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

/// The lookup-table size for `n` backends.
pub fn maglev_size(n: usize) -> usize {
    MAGLEV_SIZES
        .iter()
        .copied()
        .find(|&m| m >= n.saturating_mul(100))
        .unwrap_or(MAGLEV_SIZES[MAGLEV_SIZES.len() - 1])
}

/// Maglev's population (Eisenbud et al., NSDI '16), with weights: in round
/// `r`, backend `i` claims a slot if `floor((r+1)·w_i/w_max) >
/// floor(r·w_i/w_max)`, so shares follow weights. Offsets and skips come from
/// the backend address only, so a backend keeps its preferred slots whatever
/// else changes, and removing one of N moves only about 1/N of clients.
fn maglev_lookup(entries: &[Entry], selectable: &[u32]) -> Vec<u32> {
    let n = selectable.len();
    if n == 0 {
        return Vec::new();
    }
    let m = maglev_size(n) as u64;
    let max_weight = selectable
        .iter()
        .map(|&i| u64::from(entries[i as usize].backend.weight.max(1)))
        .max()
        .unwrap_or(1);
    let mut perms: Vec<(u64, u64, u64, u64)> = selectable
        .iter()
        .map(|&i| {
            let b = &entries[i as usize].backend;
            let key = addr_key(b.addr);
            let offset = hash64(&key, 0x9e37_79b9_7f4a_7c15) % m;
            let skip = hash64(&key, 0xc2b2_ae3d_27d4_eb4f) % (m - 1) + 1;
            (offset, skip, 0, u64::from(b.weight.max(1)))
        })
        .collect();
    const EMPTY: u32 = u32::MAX;
    let mut lookup = vec![EMPTY; m as usize];
    let mut filled = 0u64;
    let mut round = 0u64;
    while filled < m {
        for (k, (offset, skip, next, weight)) in perms.iter_mut().enumerate() {
            if (round + 1) * *weight / max_weight == round * *weight / max_weight {
                continue;
            }
            let mut slot = (*offset + *next * *skip) % m;
            while lookup[slot as usize] != EMPTY {
                *next += 1;
                slot = (*offset + *next * *skip) % m;
            }
            lookup[slot as usize] = selectable[k];
            *next += 1;
            filled += 1;
            if filled == m {
                break;
            }
        }
        round += 1;
    }
    lookup
}

fn addr_key(addr: SocketAddr) -> Vec<u8> {
    let mut key = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    key.extend_from_slice(&addr.port().to_be_bytes());
    key
}

/// The hash of a client's IP (not its port: one client, one backend).
pub fn client_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(ip) => hash64(&ip.octets(), 0x5851_f42d_4c95_7f2d),
        IpAddr::V6(ip) => hash64(&ip.octets(), 0x5851_f42d_4c95_7f2d),
    }
}

/// FNV-1a with a seed, then splitmix64's finalizer. Stable across builds and
/// processes, so both instances of a pair map clients the same way.
fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
