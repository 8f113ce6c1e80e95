//! Maglev consistent hashing: a lookup table of slots, each owned by one
//! backend; a client's address hashes to a slot.
//!
//! # Two ways to make a table
//!
//! - **Full build** ([`Maglev::build`]): Maglev's population (Eisenbud et
//!   al., NSDI '16). Every backend walks its own permutation of the slots
//!   (an offset and a skip from its address) and, in turn, claims its next
//!   free slot. The result depends on the backend set and weights only. It
//!   costs about `m·ln m` probes, each a test of one bit in a bitmap of
//!   taken slots that stays in the cache: `table-bench` measures 26 ms for
//!   1,000 backends and 57-60 ms for 10,000 here. It runs when a VIP
//!   starts, when the algorithm becomes Maglev, and when the table size
//!   changes.
//! - **Update** ([`Maglev::update`]): every other change starts from the
//!   published table and moves only the slots that must move. A backend
//!   that goes (or is disabled) frees exactly its slots; a new or heavier
//!   one takes exactly its share, one slot at a time from the backends now
//!   above theirs. Slots hold owner ids that never shift (see [`Maglev`]),
//!   so the table carries over by a copy, and the slots of a gone backend
//!   are found by a vectorised scan. `table-bench` measures 0.5 ms for
//!   1,000 backends and 4 ms for 10,000, the rest of the table rebuild
//!   included.
//!
//! # What holds after either
//!
//! - **Balance.** Each selectable backend owns `m·w/W` slots rounded down
//!   or up (`w` its weight, `W` the sum), so slot counts of equal backends
//!   differ by at most one. A full build comes close (Maglev's turns give
//!   equal backends counts one apart); the first update makes it exact.
//! - **Disruption.** An update keeps every slot whose owner may keep it.
//!   When one of N equal backends goes, the clients that move are exactly
//!   its own (1/N of them); a full build from scratch would move more (0.4 %
//!   instead of 0.1 % at 1,000 backends), because Maglev's turns cascade.
//! - **Coming home.** Every table remembers the full build it descends
//!   from (each slot's "home" backend). A freed slot goes back to its home
//!   backend when that one needs slots, and a backend above its share gives
//!   up first the slots whose home needs them. So a backend that goes and
//!   comes back gets its own clients back, and a weight raised and lowered
//!   again restores the table it started from.
//! - **Agreement.** The result is a function of the published table and
//!   the new inputs: two instances that start from the same set and see the
//!   same changes build the same tables, slot for slot. An instance that
//!   started later made its own full build of the set it found; its table
//!   differs from a long-running peer's by about what a full build would
//!   have moved over those changes (so after a failover to it, about that
//!   many clients change backend once). Full builds of the same set are the
//!   same on every instance.
//!
//! # Sizes
//! Table sizes are primes from a short ladder, the smallest at least 100×
//! the backend count: each backend owns at least 100 slots (a spread under
//! 1 %), and the size changes rarely, since a change of size is a full
//! build that remaps most clients.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::balance::backend::Entry;
use crate::balance::hash::addr_hash;

/// Lookup-table sizes: primes, the smallest at least 100× the backend count
/// is used. They must be prime: a backend's probe sequence `offset + j·skip
/// (mod m)` visits every slot only when `skip` is coprime with `m`, and
/// `skip` can be anything in `1..m`. A unit test checks every entry for
/// primality; the fill has a bound besides.
pub(crate) const SIZES: [usize; 6] = [65_537, 655_373, 1_310_719, 2_620_199, 5_240_399, 10_480_831];

/// A backend's permutation did not cover the table. Cannot happen with a
/// prime table size; the fill stops with this error rather than looping for
/// ever if the arithmetic is ever wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("maglev table of {size} slots: the permutation of backend {backend} (skip {skip}) does not cover it")]
pub(crate) struct MaglevError {
    /// The lookup-table size.
    pub size: u64,
    /// The backend whose permutation ran out.
    pub backend: SocketAddr,
    /// Its skip.
    pub skip: u64,
}

/// No owner (in a table being built, or a slot whose owner went).
const NONE: u32 = u32::MAX;

/// The lookup-table size for `n` backends.
pub(crate) fn size_for(n: usize) -> usize {
    SIZES
        .iter()
        .copied()
        .find(|&m| m >= n.saturating_mul(100))
        .unwrap_or(SIZES[SIZES.len() - 1])
}

/// A Maglev lookup table over one table's entries.
///
/// Slots hold *owner ids*, not entry indices, so that a table can be
/// carried into the next one by a copy: entry indices shift whenever a
/// backend is added or removed, owner ids never do. Ids below the home
/// table's backend count are the full build's entries, in order (a home
/// backend keeps its id while it is gone, to come home to); later ids were
/// given to backends added since, and are reused once free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Maglev {
    /// Slot → owner id. Empty when nothing is selectable.
    lookup: Vec<u32>,
    /// Owner id → its address; `None` for a free id (owns no slot).
    owners: Vec<Option<SocketAddr>>,
    /// `(address, owner id)` of every id in use, sorted by address.
    ids: Vec<(SocketAddr, u32)>,
    /// Slots owned, by owner id.
    counts: Vec<u32>,
    /// Owner id → index of its entry in this table; `NONE` when it is not
    /// selectable here (it then owns no slot).
    entry_of: Vec<u32>,
    /// Slots whose owner is not their home backend, ascending: where a
    /// backend above its share looks first for slots to give up.
    away: Vec<u32>,
    /// The full build this table descends from.
    home: Arc<Home>,
}

/// A full build's table: what "coming home" means.
#[derive(Debug, PartialEq, Eq)]
struct Home {
    /// Slot → owner id (all below `counts.len()`).
    lookup: Vec<u32>,
    /// Slots owned, by owner id.
    counts: Vec<u32>,
}

impl Maglev {
    /// The table size (0 when nothing is selectable).
    pub(crate) fn len(&self) -> usize {
        self.lookup.len()
    }

    /// The entry index that owns `slot` (< [`Maglev::len`]).
    pub(crate) fn entry(&self, slot: usize) -> usize {
        self.entry_of[self.lookup[slot] as usize] as usize
    }

    /// Slots owned, by entry index, for a table of `entries` entries.
    pub(crate) fn slots_by_entry(&self, entries: usize) -> Vec<usize> {
        let mut slots = vec![0usize; entries];
        for (id, &entry) in self.entry_of.iter().enumerate() {
            if entry != NONE {
                slots[entry as usize] = self.counts[id] as usize;
            }
        }
        slots
    }

    /// A full build over the `selectable` indices of `entries` (sorted by
    /// address, as a table's are). Owner ids are entry indices.
    pub(crate) fn build(entries: &[Entry], selectable: &[u32]) -> Result<Maglev, MaglevError> {
        let lookup = if selectable.is_empty() {
            Vec::new()
        } else {
            populate(entries, selectable, size_for(selectable.len()))?
        };
        let mut counts = vec![0u32; entries.len()];
        for &i in &lookup {
            counts[i as usize] += 1;
        }
        let mut entry_of = vec![NONE; entries.len()];
        for &i in selectable {
            entry_of[i as usize] = i;
        }
        let home = Arc::new(Home {
            lookup: lookup.clone(),
            counts: counts.clone(),
        });
        Ok(Maglev {
            lookup,
            owners: entries.iter().map(|e| Some(e.backend.addr)).collect(),
            ids: entries
                .iter()
                .enumerate()
                .map(|(i, e)| (e.backend.addr, i as u32))
                .collect(),
            counts,
            entry_of,
            away: Vec::new(),
            home,
        })
    }

    /// The table for `entries`/`selectable`, made from this one by moving
    /// only the slots that must move. A full build when the table size
    /// changes or either side has nothing selectable.
    pub(crate) fn update(&self, entries: &[Entry], selectable: &[u32]) -> Result<Maglev, MaglevError> {
        let m = size_for(selectable.len());
        if selectable.is_empty() || self.lookup.len() != m {
            return Maglev::build(entries, selectable);
        }
        let homes = self.home.counts.len();

        // Owner ids for this table's entries: the one an address had, else a
        // free id, else a new one.
        let mut owners = self.owners.clone();
        let mut ids = self.ids.clone();
        let mut id_of_entry = vec![NONE; entries.len()];
        let mut added = Vec::new();
        {
            let mut j = 0;
            for (k, e) in entries.iter().enumerate() {
                while j < ids.len() && ids[j].0 < e.backend.addr {
                    j += 1;
                }
                if j < ids.len() && ids[j].0 == e.backend.addr {
                    id_of_entry[k] = ids[j].1;
                } else {
                    added.push(k);
                }
            }
        }
        // An added id is free only if no entry of this table still has it:
        // ids of gone non-home backends are released just below, after
        // their slots are freed, so a fresh id is taken here instead.
        let mut free: Vec<usize> = (homes..owners.len()).rev().filter(|&id| owners[id].is_none()).collect();
        for &k in &added {
            let id = match free.pop() {
                Some(id) => id as u32,
                None => {
                    owners.push(None);
                    (owners.len() - 1) as u32
                }
            };
            owners[id as usize] = Some(entries[k].backend.addr);
            id_of_entry[k] = id;
        }
        if !added.is_empty() {
            ids.extend(added.iter().map(|&k| (entries[k].backend.addr, id_of_entry[k])));
            ids.sort_unstable();
        }
        let ids_len = owners.len();
        let mut entry_of = vec![NONE; ids_len];
        for &k in selectable {
            entry_of[id_of_entry[k as usize] as usize] = k;
        }
        let sel_ids: Vec<u32> = selectable.iter().map(|&k| id_of_entry[k as usize]).collect();

        let mut current = self.counts.clone();
        current.resize(ids_len, 0);
        let at_home = |id: u32| self.home.counts.get(id as usize).copied().unwrap_or(0);
        let weight = |id: u32| u64::from(entries[entry_of[id as usize] as usize].backend.weight.max(1));
        let addr = |id: u32| owners[id as usize].expect("ids in use have an address");
        let target = targets(&sel_ids, weight, addr, &current, at_home, m);

        // Slots of owners that are no longer selectable are freed; the rest
        // carry over by a copy.
        let mut lookup = self.lookup.clone();
        let mut freed = Vec::new();
        let dropped: Vec<u32> = (0..ids_len as u32)
            .filter(|&id| entry_of[id as usize] == NONE && current[id as usize] > 0)
            .collect();
        free_slots_of(&mut lookup, &dropped, &current, &mut freed);
        for &id in &dropped {
            current[id as usize] = 0;
        }
        let mut excess: Vec<u32> = current
            .iter()
            .zip(&target)
            .map(|(&c, &t)| c.saturating_sub(t))
            .collect();
        let mut deficit: Vec<u32> = current
            .iter()
            .zip(&target)
            .map(|(&c, &t)| t.saturating_sub(c))
            .collect();
        let home_of = |s: u32| self.home.lookup[s as usize];

        // Backends above their share give up slots: first slots away from
        // home whose home backend is short (it comes home), then any slot
        // away from home, then any slot. The first two look at the away
        // list only; the last scans from the start and stops as soon as
        // every excess is shed (after about `m/n·ln n` slots when each of
        // many backends sheds one).
        let mut left: u64 = excess.iter().map(|&e| u64::from(e)).sum();
        for pass in 0..3 {
            if left == 0 {
                break;
            }
            let candidates: Box<dyn Iterator<Item = u32>> = if pass < 2 {
                Box::new(self.away.iter().copied())
            } else {
                Box::new(0..m as u32)
            };
            for s in candidates {
                let o = lookup[s as usize];
                if o == NONE || excess[o as usize] == 0 {
                    continue;
                }
                if pass == 0 {
                    let h = home_of(s);
                    if h == o || deficit[h as usize] == 0 {
                        continue;
                    }
                }
                excess[o as usize] -= 1;
                lookup[s as usize] = NONE;
                freed.push(s);
                left -= 1;
                if left == 0 {
                    break;
                }
            }
        }

        // Hand the freed slots out: home first, then round robin over the
        // backends still short, in entry order.
        let mut rest = Vec::new();
        for &s in &freed {
            let h = home_of(s);
            if deficit[h as usize] > 0 {
                deficit[h as usize] -= 1;
                lookup[s as usize] = h;
            } else {
                rest.push(s);
            }
        }
        let mut short: Vec<u32> = sel_ids.iter().copied().filter(|&id| deficit[id as usize] > 0).collect();
        let mut rest = rest.into_iter();
        while !short.is_empty() {
            for &id in &short {
                let Some(s) = rest.next() else {
                    break;
                };
                lookup[s as usize] = id;
                deficit[id as usize] -= 1;
            }
            short.retain(|&id| deficit[id as usize] > 0);
            if rest.len() == 0 {
                break;
            }
        }
        // Every slot left without an owner is in `freed`, so none is left
        // once all of them are handed out.
        debug_assert!(rest.len() == 0 && short.is_empty(), "freed slots and shortfalls differ");
        if rest.len() != 0 || !short.is_empty() {
            // Unreachable by the arithmetic above; a full build is always right.
            return Maglev::build(entries, selectable);
        }

        // Ids of backends gone from the table (not merely unselectable) and
        // not home ids own nothing now: free them for reuse.
        let present: Vec<bool> = {
            let mut p = vec![false; ids_len];
            for &id in &id_of_entry {
                p[id as usize] = true;
            }
            p
        };
        for id in homes..ids_len {
            if !present[id] {
                owners[id] = None;
            }
        }
        ids.retain(|&(_, id)| (id as usize) < homes || present[id as usize]);

        // Slots away from home now: the old ones still away, and the moved
        // ones that did not land at home.
        let mut away: Vec<u32> = self
            .away
            .iter()
            .chain(&freed)
            .copied()
            .filter(|&s| lookup[s as usize] != home_of(s))
            .collect();
        away.sort_unstable();
        away.dedup();
        Ok(Maglev {
            lookup,
            owners,
            ids,
            counts: target,
            entry_of,
            away,
            home: Arc::clone(&self.home),
        })
    }
}

/// Frees (sets to `NONE`, appends to `freed`) every slot of the `dropped`
/// owners, who own `counts[id]` slots each; stops once all are found. With
/// up to four dropped owners (the usual change) it compares 64 slots at a
/// time, which the compiler turns into vector compares.
fn free_slots_of(lookup: &mut [u32], dropped: &[u32], counts: &[u32], freed: &mut Vec<u32>) {
    let mut left: u64 = dropped.iter().map(|&id| u64::from(counts[id as usize])).sum();
    if left == 0 {
        return;
    }
    const CHUNK: usize = 64;
    if dropped.len() <= 4 {
        // `NONE` never appears in a carried table, so it pads safely.
        let mut d = [NONE; 4];
        d[..dropped.len()].copy_from_slice(dropped);
        let hit = |x: u32| (x == d[0]) | (x == d[1]) | (x == d[2]) | (x == d[3]);
        for (c, chunk) in lookup.chunks_mut(CHUNK).enumerate() {
            if !chunk.iter().fold(false, |any, &x| any | hit(x)) {
                continue;
            }
            for (k, x) in chunk.iter_mut().enumerate() {
                if hit(*x) {
                    *x = NONE;
                    freed.push((c * CHUNK + k) as u32);
                    left -= 1;
                }
            }
            if left == 0 {
                return;
            }
        }
    } else {
        let mut is_dropped = vec![false; counts.len()];
        for &id in dropped {
            is_dropped[id as usize] = true;
        }
        for (s, x) in lookup.iter_mut().enumerate() {
            if *x != NONE && is_dropped[*x as usize] {
                *x = NONE;
                freed.push(s as u32);
                left -= 1;
                if left == 0 {
                    return;
                }
            }
        }
    }
}

/// Each selectable owner's slot count in a table of `m`: its exact share
/// `m·w/W` rounded down or up, summing to `m`. Which rounding: its current
/// count if that is one of the two (nothing moves), else its count at home
/// if that is (it comes home), else the nearer. Where the sum needs an
/// owner moved from one rounding to the other: one whose home count lies
/// that way first, then one whose move costs no slot (lowering an owner
/// that is short anyway), then by remainder, then by address hash.
fn targets(
    sel_ids: &[u32],
    weight: impl Fn(u32) -> u64,
    addr: impl Fn(u32) -> SocketAddr,
    current: &[u32],
    at_home: impl Fn(u32) -> u32,
    m: usize,
) -> Vec<u32> {
    let total: u64 = sel_ids.iter().map(|&id| weight(id)).sum();
    let mut target = vec![0u32; current.len()];
    // (low, high, remainder) per selectable owner, in `sel_ids` order.
    let bounds: Vec<(u32, u32, u64)> = sel_ids
        .iter()
        .map(|&id| {
            // At most 2^24 slots × 2^32 weight: fits.
            let exact = m as u64 * weight(id);
            let low = (exact / total) as u32;
            let rem = exact % total;
            (low, low + u32::from(rem > 0), rem)
        })
        .collect();
    let mut sum: i64 = 0;
    for (&id, &(low, high, _)) in sel_ids.iter().zip(&bounds) {
        let (now, home) = (current[id as usize], at_home(id));
        target[id as usize] = if (low..=high).contains(&now) {
            now
        } else if (low..=high).contains(&home) {
            home
        } else {
            now.clamp(low, high)
        };
        sum += i64::from(target[id as usize]);
    }
    let tiebreak = |id: u32| addr_hash(addr(id), 0x2545_f491_4f6c_dd1d);
    let diff = m as i64 - sum;
    if diff > 0 {
        // Raise some from low to high (raising never costs a move).
        let mut up: Vec<(bool, std::cmp::Reverse<u64>, u64, u32)> = sel_ids
            .iter()
            .zip(&bounds)
            .filter(|(&id, &(_, high, _))| target[id as usize] < high)
            .map(|(&id, &(_, _, rem))| {
                let t = target[id as usize];
                (at_home(id) <= t, std::cmp::Reverse(rem), tiebreak(id), id)
            })
            .collect();
        up.sort_unstable();
        for &(.., id) in up.iter().take(diff as usize) {
            target[id as usize] += 1;
        }
    } else if diff < 0 {
        // Lower some from high to low.
        let mut down: Vec<(bool, bool, u64, u64, u32)> = sel_ids
            .iter()
            .zip(&bounds)
            .filter(|(&id, &(low, _, _))| target[id as usize] > low)
            .map(|(&id, &(_, _, rem))| {
                let t = target[id as usize];
                (at_home(id) >= t, current[id as usize] >= t, rem, tiebreak(id), id)
            })
            .collect();
        down.sort_unstable();
        for &(.., id) in down.iter().take((-diff) as usize) {
            target[id as usize] -= 1;
        }
    }
    target
}

/// Maglev's population with weights: in round `r`, backend `i` claims a
/// slot if `floor((r+1)·w_i/w_max) > floor(r·w_i/w_max)`, so shares follow
/// weights. Offsets and skips come from the backend address only.
pub(crate) fn populate(entries: &[Entry], selectable: &[u32], size: usize) -> Result<Vec<u32>, MaglevError> {
    let n = selectable.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let m = size as u64;
    let max_weight = selectable
        .iter()
        .map(|&i| u64::from(entries[i as usize].backend.weight.max(1)))
        .max()
        .unwrap_or(1);
    // (position of the next probe, skip, probes made, weight) per
    // selectable backend. The position moves by `skip` with a compare and
    // subtract, not a division: the fill makes ~m·ln m probes.
    let mut perms: Vec<(u64, u64, u64, u64)> = selectable
        .iter()
        .map(|&i| {
            let b = &entries[i as usize].backend;
            let offset = addr_hash(b.addr, 0x9e37_79b9_7f4a_7c15) % m;
            let skip = addr_hash(b.addr, 0xc2b2_ae3d_27d4_eb4f) % (m - 1) + 1;
            (offset, skip, 0, u64::from(b.weight.max(1)))
        })
        .collect();
    let mut lookup = vec![NONE; size];
    // Which slots are taken, one bit each: the probes read this instead of
    // `lookup`. Most probes of the fill's tail find a taken slot, and at
    // 10,000 backends `lookup` is 5 MiB of random reads while this is 160
    // KiB, which stays in the cache. The result is the same table.
    let mut taken = vec![0u64; size.div_ceil(64)];
    let mut filled = 0u64;
    let mut round = 0u64;
    // Termination: every round, the backend of the highest weight claims a
    // slot (its share rises by one each round), and each claim probes at
    // most `m` positions of its permutation (`next < m` is checked, not
    // assumed), so the fill ends after at most `m` rounds.
    while filled < m {
        for (k, (pos, skip, next, weight)) in perms.iter_mut().enumerate() {
            if (round + 1) * *weight / max_weight == round * *weight / max_weight {
                continue;
            }
            let slot = loop {
                if *next >= m {
                    return Err(MaglevError {
                        size: m,
                        backend: entries[selectable[k] as usize].backend.addr,
                        skip: *skip,
                    });
                }
                let slot = *pos as usize;
                *pos += *skip;
                if *pos >= m {
                    *pos -= m;
                }
                *next += 1;
                let (word, bit) = (slot / 64, 1u64 << (slot % 64));
                if taken[word] & bit == 0 {
                    taken[word] |= bit;
                    break slot;
                }
            };
            lookup[slot] = selectable[k];
            filled += 1;
            if filled == m {
                break;
            }
        }
        round += 1;
    }
    Ok(lookup)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::balance::backend::{Backend, BackendState};

    fn entry(i: usize, weight: u32) -> Entry {
        let addr: SocketAddr = format!("10.0.{}.{}:80", i / 250, i % 250 + 1).parse().unwrap();
        Entry {
            backend: Backend {
                addr,
                weight,
                zone: None,
                region: None,
                rack: None,
            },
            state: Arc::new(BackendState::new(addr)),
            disabled: false,
        }
    }

    fn entries(n: usize, weight: impl Fn(usize) -> u32) -> Vec<Entry> {
        (0..n).map(|i| entry(i, weight(i))).collect()
    }

    fn all(entries: &[Entry]) -> Vec<u32> {
        (0..entries.len() as u32).collect()
    }

    /// Slot → owner address.
    fn owners(table: &Maglev, e: &[Entry]) -> Vec<SocketAddr> {
        (0..table.len()).map(|s| e[table.entry(s)].backend.addr).collect()
    }

    /// Slots that changed owner between two tables of the same size.
    fn moved(a: &[SocketAddr], b: &[SocketAddr]) -> usize {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    /// Every selectable backend owns its exact share rounded down or up,
    /// and the counts the table keeps are the true ones.
    fn assert_exact_shares(table: &Maglev, e: &[Entry], sel: &[u32]) {
        let m = table.len() as u64;
        let total: u64 = sel.iter().map(|&i| u64::from(e[i as usize].backend.weight)).sum();
        let mut counts = vec![0usize; e.len()];
        for s in 0..table.len() {
            counts[table.entry(s)] += 1;
        }
        assert_eq!(counts, table.slots_by_entry(e.len()), "kept counts are the true ones");
        for (i, &c) in counts.iter().enumerate() {
            if !sel.contains(&(i as u32)) {
                assert_eq!(c, 0, "unselectable backend {i} owns slots");
                continue;
            }
            let exact = m * u64::from(e[i].backend.weight);
            let low = exact / total;
            let high = low + u64::from(!exact.is_multiple_of(total));
            assert!(
                (low..=high).contains(&(c as u64)),
                "backend {i}: {c} slots, share {low}..={high}"
            );
        }
    }

    #[test]
    fn removing_one_of_n_moves_exactly_its_slots_and_it_comes_home() {
        for n in [2usize, 10, 300] {
            let e = entries(n, |_| 1);
            let full = Maglev::build(&e, &all(&e)).unwrap();
            let before = owners(&full, &e);
            let gone = e[n / 3].backend.addr;
            let had = before.iter().filter(|&&a| a == gone).count();

            // Removed from the set: the remaining entries shift index.
            let rest: Vec<Entry> = e.iter().filter(|x| x.backend.addr != gone).cloned().collect();
            let without = full.update(&rest, &all(&rest)).unwrap();
            assert_exact_shares(&without, &rest, &all(&rest));
            let after = owners(&without, &rest);
            assert_eq!(
                moved(&before, &after),
                had,
                "n={n}: only the gone backend's clients move"
            );
            assert!(before.iter().zip(&after).all(|(b, a)| b == a || *b == gone));

            // Back again: exactly the original table.
            let back = without.update(&e, &all(&e)).unwrap();
            assert_eq!(owners(&back, &e), before, "n={n}: it gets its own clients back");
            assert_exact_shares(&back, &e, &all(&e));
        }
    }

    #[test]
    fn a_disabled_backend_frees_its_slots_like_a_removed_one() {
        let e = entries(10, |_| 1);
        let full = Maglev::build(&e, &all(&e)).unwrap();
        let sel: Vec<u32> = all(&e).into_iter().filter(|&i| i != 4).collect();
        let off = full.update(&e, &sel).unwrap();
        assert_exact_shares(&off, &e, &sel);
        let had = full.slots_by_entry(e.len())[4];
        assert_eq!(moved(&owners(&full, &e), &owners(&off, &e)), had);
        let on = off.update(&e, &all(&e)).unwrap();
        assert_eq!(owners(&on, &e), owners(&full, &e));
    }

    #[test]
    fn a_new_backend_takes_its_share_from_the_others_and_nothing_else_moves() {
        let e = entries(11, |_| 1);
        let first: Vec<Entry> = e[..10].to_vec();
        let full = Maglev::build(&first, &all(&first)).unwrap();
        let grown = full.update(&e, &all(&e)).unwrap();
        assert_exact_shares(&grown, &e, &all(&e));
        let before = owners(&full, &first);
        let after = owners(&grown, &e);
        let newcomer = e[10].backend.addr;
        let taken = after.iter().filter(|&&a| a == newcomer).count();
        assert_eq!(
            moved(&before, &after),
            taken,
            "every moved client moved to the newcomer"
        );
        // The newcomer's share came from everyone, not from one backend.
        let losers: HashSet<SocketAddr> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a)
            .map(|(b, _)| *b)
            .collect();
        assert_eq!(losers.len(), 10);
    }

    #[test]
    fn a_weight_raised_and_lowered_again_restores_the_table() {
        let e = entries(10, |_| 1);
        let heavy = entries(10, |i| if i == 3 { 3 } else { 1 });
        let full = Maglev::build(&e, &all(&e)).unwrap();
        let up = full.update(&heavy, &all(&heavy)).unwrap();
        assert_exact_shares(&up, &heavy, &all(&heavy));
        let gained = up.slots_by_entry(10)[3] - full.slots_by_entry(10)[3];
        assert_eq!(moved(&owners(&full, &e), &owners(&up, &heavy)), gained);
        let down = up.update(&e, &all(&e)).unwrap();
        assert_eq!(owners(&down, &e), owners(&full, &e));
    }

    #[test]
    fn a_new_table_size_is_a_full_build() {
        let e = entries(700, |_| 1);
        let small: Vec<Entry> = e[..600].to_vec();
        let full = Maglev::build(&small, &all(&small)).unwrap();
        assert_eq!(full.len(), 65_537);
        let grown = full.update(&e, &all(&e)).unwrap();
        assert_eq!(grown.len(), 655_373);
        assert_eq!(grown, Maglev::build(&e, &all(&e)).unwrap());
    }

    #[test]
    fn the_same_changes_give_both_instances_the_same_table() {
        // Two instances of a pair, started on the same set, fed the same
        // discovery updates: slot for slot the same tables.
        let steps: Vec<Vec<Entry>> = vec![
            entries(50, |_| 1),
            entries(50, |i| if i == 7 { 4 } else { 1 }),
            entries(50, |i| if i == 7 { 4 } else { 1 })
                .into_iter()
                .filter(|x| x.backend.addr.port() == 80 && x.backend.addr.to_string() != "10.0.0.20:80")
                .collect(),
            entries(55, |_| 1),
        ];
        let run = || {
            let mut table = Maglev::build(&steps[0], &all(&steps[0])).unwrap();
            for w in steps.windows(2) {
                table = table.update(&w[1], &all(&w[1])).unwrap();
            }
            table
        };
        assert_eq!(run(), run());
    }

    fn is_prime(n: u64) -> bool {
        n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
    }

    #[test]
    fn every_maglev_size_is_prime_and_sizes_rise() {
        for &m in &SIZES {
            assert!(is_prime(m as u64), "{m} is not prime");
        }
        assert!(SIZES.windows(2).all(|w| w[0] < w[1]));
        // Each size serves the backend counts that reach it.
        assert_eq!(size_for(13_108), 2_620_199);
        assert_eq!(size_for(20_000), 2_620_199);
        assert_eq!(size_for(1_000_000), 10_480_831);
    }

    /// Maglev's population as the paper writes it, reading the table
    /// itself to find a free slot.
    fn populate_by_the_paper(entries: &[Entry], selectable: &[u32], size: usize) -> Vec<u32> {
        let m = size as u64;
        let max_weight = selectable
            .iter()
            .map(|&i| u64::from(entries[i as usize].backend.weight.max(1)))
            .max()
            .unwrap();
        let mut perms: Vec<(u64, u64, u64)> = selectable
            .iter()
            .map(|&i| {
                let b = &entries[i as usize].backend;
                let offset = addr_hash(b.addr, 0x9e37_79b9_7f4a_7c15) % m;
                let skip = addr_hash(b.addr, 0xc2b2_ae3d_27d4_eb4f) % (m - 1) + 1;
                (offset, skip, u64::from(b.weight.max(1)))
            })
            .collect();
        let mut lookup = vec![NONE; size];
        let (mut filled, mut round) = (0, 0u64);
        while filled < size {
            for (k, (pos, skip, weight)) in perms.iter_mut().enumerate() {
                if filled == size || (round + 1) * *weight / max_weight == round * *weight / max_weight {
                    continue;
                }
                while lookup[*pos as usize] != NONE {
                    *pos = (*pos + *skip) % m;
                }
                lookup[*pos as usize] = selectable[k];
                *pos = (*pos + *skip) % m;
                filled += 1;
            }
            round += 1;
        }
        lookup
    }

    #[test]
    fn the_fill_gives_the_papers_table() {
        // The bitmap of taken slots is a speed-up only: instances of
        // different versions must still build the same table from the
        // same set.
        for (n, size) in [(1, 65_537), (7, 65_537), (100, 65_537), (1_000, 655_373)] {
            let e = entries(n, |i| (i % 4 + 1) as u32);
            let sel: Vec<u32> = all(&e).into_iter().filter(|i| i % 5 != 3).collect();
            assert_eq!(
                populate(&e, &sel, size).unwrap(),
                populate_by_the_paper(&e, &sel, size),
                "{n} backends"
            );
        }
    }

    #[test]
    fn maglev_fill_of_a_composite_size_is_an_error_not_a_hang() {
        // 5,240,389 = 7·11²·23·269 was once in SIZES. Find a backend
        // whose skip shares a factor with a small composite size: its
        // permutation misses slots, and the fill must say so and stop.
        let m = 7 * 11 * 13; // 1001
        let e = entries(40, |_| 1);
        let sel = all(&e);
        let err = populate(&e, &sel, m).expect_err("some skip shares a factor with 1001");
        assert!(err.to_string().contains("does not cover"), "{err}");
    }

    #[test]
    fn maglev_with_20k_backends_fills_every_slot() {
        // 13,108 or more backends once selected a composite size and hung
        // the control thread for ever.
        let e = entries(20_000, |i| (i % 3 + 1) as u32);
        let sel = all(&e);
        let table = Maglev::build(&e, &sel).unwrap();
        assert_eq!(table.len(), size_for(20_000));
        assert!((0..table.len()).all(|s| table.entry(s) < e.len()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
        ))]

        /// Maglev construction over random backend sets, weights and table
        /// sizes always ends; with a prime size every slot is filled and
        /// every backend owns one (while there are more slots than
        /// backends); with any size it either fills or says why.
        #[test]
        fn maglev_construction_always_terminates(
            n in 1usize..300,
            weights in proptest::collection::vec(1u32..=1000, 300),
            size in 2usize..20_000,
            disabled in proptest::collection::vec(any::<bool>(), 300),
        ) {
            let e = entries(n, |i| weights[i]);
            let sel: Vec<u32> = (0..n as u32).filter(|&i| !disabled[i as usize] || i == 0).collect();
            match populate(&e, &sel, size) {
                Ok(lookup) => {
                    prop_assert_eq!(lookup.len(), size);
                    prop_assert!(lookup.iter().all(|b| sel.contains(b)));
                }
                Err(err) => prop_assert!(!is_prime(size as u64), "prime size {} failed: {}", size, err),
            }
            let prime = (size..).find(|&m| is_prime(m as u64)).unwrap();
            let lookup = populate(&e, &sel, prime).unwrap();
            prop_assert!(lookup.iter().all(|b| sel.contains(b)));
            if prime >= sel.len() && weights[..n].iter().all(|&w| w == weights[0]) {
                let owners: std::collections::HashSet<u32> = lookup.iter().copied().collect();
                prop_assert_eq!(owners.len(), sel.len());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
        ))]

        /// Any chain of changes of set, weights and disabled backends:
        /// after each, shares are exact, every slot has a selectable owner,
        /// and the slots that moved are the fewest possible: those whose
        /// owner had to shed them (gone, disabled, or above its new share).
        #[test]
        fn updates_keep_exact_shares_and_move_the_fewest_slots(
            steps in proptest::collection::vec(
                (
                    1usize..60,
                    proptest::collection::vec(1u32..=8, 60),
                    proptest::collection::vec(any::<bool>(), 60),
                ),
                2..6,
            ),
        ) {
            let config = |(n, weights, off): &(usize, Vec<u32>, Vec<bool>)| {
                let e = entries(*n, |i| weights[i]);
                let sel: Vec<u32> = (0..*n as u32).filter(|&i| !off[i as usize] || i == 0).collect();
                (e, sel)
            };
            let (mut e, mut sel) = config(&steps[0]);
            let mut table = Maglev::build(&e, &sel).unwrap();
            for step in &steps[1..] {
                let (f, f_sel) = config(step);
                let next = table.update(&f, &f_sel).unwrap();
                prop_assert_eq!(next.len(), size_for(f_sel.len()));
                assert_exact_shares(&next, &f, &f_sel);
                if next.len() == table.len() {
                    // The fewest moves: each owner loses max(0, old − new) slots.
                    let before = owners(&table, &e);
                    let after = owners(&next, &f);
                    let mut must_shed = 0usize;
                    for &i in &sel {
                        let addr = e[i as usize].backend.addr;
                        let old = table.slots_by_entry(e.len())[i as usize];
                        let new = f
                            .iter()
                            .position(|y| y.backend.addr == addr)
                            .map_or(0, |j| next.slots_by_entry(f.len())[j]);
                        must_shed += old.saturating_sub(new);
                    }
                    prop_assert_eq!(moved(&before, &after), must_shed);
                }
                (e, sel, table) = (f, f_sel, next);
            }
        }
    }
}
